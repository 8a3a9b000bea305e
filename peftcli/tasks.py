"""Turning rows into model features per task (labels, prompts, loss masks) and batching them."""
from __future__ import annotations

import dataclasses

import torch

from .data import require_columns
from .errors import UserError
from .recipe import DataSection, ModelSection

IGNORE = -100  # label value the HF losses skip
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclasses.dataclass
class Prepared:
    train: list[dict]
    eval: list[dict] | None
    labels: list[str] | None  # class names in id order (classification); None for LM / regression
    dropped: dict[str, int]   # reason -> rows dropped


def infer_labels(rows: list[dict], column: str, model: ModelSection) -> list[str] | None:
    """Label names in id order: from the recipe, else sorted from the data (numerically if all integers)."""
    if model.labels:
        return list(model.labels)
    if model.num_labels == 1:
        return None  # regression
    values = sorted({str(v) for row in rows for v in _as_list(row[column])})
    if all(_is_int(v) for v in values):
        values = sorted(values, key=int)
    if len(values) < 2:
        raise UserError(f"data.train: column '{column}' has a single label value {values}; classification needs "
                        f"at least two (for regression set model.num_labels: 1)")
    return values


def prepare(task: str, tokenizer, section: DataSection, model: ModelSection, train: list[dict],
            evaluation: list[dict] | None, labels: list[str] | None = None) -> Prepared:
    """Tokenise both splits. `labels` fixes the label order (from a finished run) instead of inferring it."""
    if section.packing and task != "causal-lm":
        raise UserError(f"data.packing: padding-free packing is for causal-lm SFT; task '{task}' pads each batch "
                        f"(use train.train_sampling_strategy: group_by_length to cut padding instead)")
    if task == "sequence-classification":
        require_columns(train, [section.text, section.label] + ([section.text_pair] if section.text_pair else []),
                        "data.train")
        labels = labels if labels is not None else infer_labels(train, section.label, model)
        encode = lambda rows, key: _encode_classification(rows, key, tokenizer, section, labels)  # noqa: E731
    elif task == "token-classification":
        require_columns(train, [section.tokens, section.tags], "data.train")
        labels = labels if labels is not None else infer_labels(train, section.tags, model)
        encode = lambda rows, key: _encode_tokens(rows, key, tokenizer, section, labels)  # noqa: E731
    elif task == "causal-lm":
        from .lm_data import encode_causal_lm

        encode = lambda rows, key: encode_causal_lm(rows, key, tokenizer, section)  # noqa: E731
        labels = None
    elif task == "image-classification":
        from .image_data import encode_images

        require_columns(train, [section.image, section.label], "data.train")
        labels = labels if labels is not None else infer_labels(train, section.label, model)
        encode = lambda rows, key: encode_images(rows, key, section.image, section.label, labels)  # noqa: E731
    else:
        raise UserError(f"model.task: '{task}' has no data pipeline yet; supported: sequence-classification, "
                        f"token-classification, causal-lm")
    dropped: dict[str, int] = {}
    train_features = encode(train, "data.train")
    eval_features = None
    if evaluation is not None:
        eval_features = encode(evaluation, "data.eval")
    for features in (train_features, eval_features):
        if features is not None:
            for reason, count in getattr(features, "dropped", {}).items():
                dropped[reason] = dropped.get(reason, 0) + count
    return Prepared(list(train_features), None if eval_features is None else list(eval_features), labels, dropped)


def _encode_classification(rows, key, tokenizer, section: DataSection, labels):
    require_columns(rows, [section.text, section.label] + ([section.text_pair] if section.text_pair else []), key)
    texts = [str(r[section.text]) for r in rows]
    pairs = [str(r[section.text_pair]) for r in rows] if section.text_pair else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=section.max_length)
    ids = _label_ids(rows, section.label, labels, key)
    return [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             **({"token_type_ids": encoded["token_type_ids"][i]} if "token_type_ids" in encoded else {}),
             "labels": ids[i]} for i in range(len(rows))]


def _label_ids(rows, column, labels, key):
    if labels is None:  # regression: float targets
        out = []
        for number, row in enumerate(rows, start=1):
            try:
                out.append(float(row[column]))
            except (TypeError, ValueError):
                raise UserError(f"{key}: row {number}: label {row[column]!r} is not a number (regression)") from None
        return out
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for number, row in enumerate(rows, start=1):
        value = str(row[column])
        if value not in index:
            raise UserError(f"{key}: row {number}: label {value!r} is not one of the {len(labels)} labels "
                            f"{labels[:10]} (set model.labels to list them all)")
        out.append(index[value])
    return out


def _encode_tokens(rows, key, tokenizer, section: DataSection, labels):
    require_columns(rows, [section.tokens, section.tags], key)
    index = {name: i for i, name in enumerate(labels)}
    features = []
    for number, row in enumerate(rows, start=1):
        words, tags = row[section.tokens], row[section.tags]
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise UserError(f"{key}: row {number}: '{section.tokens}' and '{section.tags}' must be lists of "
                            f"equal length")
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=section.max_length)
        previous, label_ids = None, []
        for word in encoded.word_ids():
            # Only a word's first sub-token carries its tag (the others are ignored by loss and metrics).
            label_ids.append(IGNORE if word is None or word == previous else index[str(tags[word])])
            previous = word
        features.append({**{k: v for k, v in encoded.items()}, "labels": label_ids})
    return features


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
        from .image_data import ImageCollator

        return ImageCollator(tokenizer)  # for images, `tokenizer` is image_data.ImageInputs
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


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False
