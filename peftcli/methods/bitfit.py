"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the frozen model."""
from __future__ import annotations

import dataclasses
import re

from torch import nn

from ..errors import UserError
from ..config.schema import field
from .registry import Method


@dataclasses.dataclass
class BitFitConfig:
    pattern: str = field(r"(^|\.)bias$", doc="regex over parameter names selecting the biases to train")


def inject(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    pattern = re.compile(cfg.pattern)
    chosen = [p for n, p in model.named_parameters() if n.endswith("bias") and pattern.search(n)]
    if not chosen:
        raise UserError(f"method.pattern {cfg.pattern!r} selects no bias of this model (has it biases at all? "
                        f"Llama-style models are built without them)")
    for p in chosen:
        p.requires_grad_(True)
    return model


def merge(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    return model  # the trained biases already live in the base model's own tensors


METHOD = Method(
    name="bitfit", summary="train only bias terms", config_cls=BitFitConfig, inject=inject, merge=merge,
    paper="Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based MLMs")
