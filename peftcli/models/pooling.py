"""Which vector a sequence-classification head reads: the architecture's own choice, or the pooling the base model
was trained with (sentence-transformers folders declare it in `1_Pooling/config.json`).

The head itself (e.g. BERT's pooler + classifier, RoBERTa's dense + out_proj, Llama's score) is never changed:
only its input is. Each architecture's head reads one position of the backbone's output (the first token, or the
last non-padding one); the chosen pooled vector is put in every position, so whichever it reads, it gets that."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

# `pooler`: the architecture's own reading (BERT: the pooler over [CLS]; RoBERTa: <s>; Llama: the last token).
POOLING_MODES = ("auto", "pooler", "cls", "mean", "max", "last")
# sentence-transformers' Pooling config keys, in the order their library applies them.
SENTENCE_TRANSFORMERS_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                              "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}


def folder_pooling(model_dir: str | None) -> str | None:
    """The pooling a sentence-transformers model folder declares (None: none declared, or not a local folder)."""
    if not model_dir:
        return None
    for config in (Path(model_dir) / "1_Pooling" / "config.json", Path(model_dir) / "pooling_config.json"):
        if config.is_file():
            try:
                settings = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None  # an unreadable extra file: fall back to the architecture's own head
            chosen = [mode for key, mode in SENTENCE_TRANSFORMERS_KEYS.items() if settings.get(key)]
            return chosen[0] if len(chosen) == 1 else None  # combined modes have no single-vector equivalent
    return None


def resolve_pooling(setting: str, model_dir: str | None, task: str) -> str:
    """`auto` -> the folder's declared pooling for sequence classification, else `pooler`."""
    if setting != "auto":
        return setting
    declared = folder_pooling(model_dir) if task == "sequence-classification" else None
    return declared or "pooler"


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """[batch, tokens, dim] -> [batch, dim] over the tokens the mask keeps (all of them without a mask)."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = fit_mask(mask.to(hidden.device), hidden.shape[1])
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
    if mode == "max":
        return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).max(1).values
    if mode == "last":  # the last kept position: right or left padding alike
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), (mask.bool() * positions).argmax(1)]
    raise ValueError(f"unknown pooling {mode!r}")


def fit_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The backbone may see more positions than the mask it was called with covers (methods that prepend virtual
    tokens extend it themselves; key/value prefixes make it longer than the hidden states): align on the end."""
    if mask.shape[1] == tokens:
        return mask
    if mask.shape[1] > tokens:
        return mask[:, -tokens:]
    pad = torch.ones(mask.shape[0], tokens - mask.shape[1], dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=1)


class PoolingHooks:
    """Forward hooks that feed a classification head the pooled vector. The attention mask is taken from the
    backbone's own call (after any method has rewritten the inputs), the pooled vector put in every position of
    what the head reads: the pooler's input where the backbone has a pooler, else the backbone's output."""

    def __init__(self, model: nn.Module, mode: str):
        self.mode, self.mask = mode, None
        backbone = getattr(model, model.base_model_prefix)
        pooler = getattr(backbone, "pooler", None)
        if isinstance(pooler, nn.Linear):
            raise UserError(f"model.pooling: {mode} is not available for {type(model).__name__}, whose pooler reads "
                            f"one token itself; use model.pooling: pooler")
        self.handles = [backbone.register_forward_pre_hook(self.take_mask, with_kwargs=True)]
        if isinstance(pooler, nn.Module):
            self.handles.append(pooler.register_forward_pre_hook(self.pool_pooler_input))
        else:
            self.handles.append(backbone.register_forward_hook(self.pool_output))

    def take_mask(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return pool(hidden, self.mask, self.mode).unsqueeze(1).expand_as(hidden)

    def pool_pooler_input(self, module, args):
        return (self.pooled(args[0]), *args[1:])

    def pool_output(self, module, args, output):
        if isinstance(output, tuple):
            return (self.pooled(output[0]), *output[1:])
        output.last_hidden_state = self.pooled(output.last_hidden_state)
        return output


def install_pooling(model: nn.Module, mode: str) -> None:
    """`mode` resolved (not `auto`); `pooler` leaves the model as the architecture built it."""
    if mode != "pooler":
        model.peft_pooling = PoolingHooks(model, mode)
