"""Collators: features to padded (or packed) tensors, per task."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .prepare import IGNORE


def make_collator(task: str, tokenizer, pad_to_multiple_of: int | None = None, packing: bool = False,
                  boundaries: bool = False):
    """`boundaries`: packed batches also carry each example's span for varlen attention (kernels/varlen.py)."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if packing:  # recipe validation allows it for causal-lm only
        return PackedCausalLMCollator(boundaries)
    if task == "sequence-classification":
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    if task == "token-classification":
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    if task == "image-classification":
        return ImageCollator(tokenizer)  # for images, `tokenizer` is models.image_inputs.ImageInputs
    return CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of)


@dataclasses.dataclass
class CausalLMCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (IGNORE)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@dataclasses.dataclass
class PackedCausalLMCollator:
    """Padding-free packing: the batch's examples laid end to end in one row, no padding at all.

    position_ids restart at 0 for each example; with no attention_mask, transformers reads the restarts as
    sequence boundaries (block-diagonal mask for eager/sdpa, varlen kernels for flash attention), so no token
    attends across examples. Each example's first label becomes IGNORE: it would otherwise be the target of
    the previous example's last token. The unpadded batch never scores that position either (labels shift by
    one), so the loss and the Trainer's token count equal the padded batch's.

    With `boundaries`, the batch also holds the examples' cumulative lengths and the longest one under the names
    of transformers' flash-attention kwargs (cu_seq_lens_q/k, max_length_q/k): varlen attention reads them
    instead of a block-diagonal mask, and finding them here costs no GPU synchronisation.
    """

    boundaries: bool = False

    def __call__(self, features: list[dict]) -> dict:
        ids, labels, positions, ends = [], [], [], [0]
        for f in features:
            ids += list(f["input_ids"])
            labels += [IGNORE] + list(f["labels"])[1:]
            positions += range(len(f["input_ids"]))
            ends.append(len(ids))
        batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                 "position_ids": torch.tensor([positions])}
        if self.boundaries:
            cu_seq = torch.tensor(ends, dtype=torch.int32)
            longest = max(len(f["input_ids"]) for f in features)
            batch.update(cu_seq_lens_q=cu_seq, cu_seq_lens_k=cu_seq, max_length_q=longest, max_length_k=longest)
        return batch


@dataclasses.dataclass
class ImageCollator:
    inputs: Callable  # models.image_inputs.ImageInputs: image sources -> pixel_values

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.inputs([f["image"] for f in features]),
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}
