"""Freezing / layer-wise tuning: train only the top N transformer layers and/or parameters matching regexes."""
from __future__ import annotations

import dataclasses
import re

from torch import nn

from ..errors import UserError
from ..config.schema import field, non_negative
from .registry import Method, layer_index, num_layers


@dataclasses.dataclass
class FreezeConfig:
    top_layers: int = field(1, check=non_negative, doc="train the top N transformer layers")
    patterns: list[str] = field(factory=list, doc="also train parameters whose names match these regexes")
    train_embeddings: bool = field(False, doc="also train the embedding layer")


def validate(cfg: FreezeConfig) -> str | None:
    if cfg.top_layers == 0 and not cfg.patterns and not cfg.train_embeddings:
        return "freeze trains nothing but the head: set top_layers, patterns or train_embeddings"
    for pattern in cfg.patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"patterns: {pattern!r} is not a valid regex ({exc})"
    return None


def inject(model: nn.Module, cfg: FreezeConfig) -> nn.Module:
    total = num_layers(model)
    if cfg.top_layers > total:
        raise UserError(f"method.top_layers is {cfg.top_layers} but the model has {total} layers")
    first_trained = total - cfg.top_layers
    patterns = [re.compile(p) for p in cfg.patterns]
    for name, p in model.named_parameters():
        index = layer_index(name)
        if (index is not None and index >= first_trained) or any(rx.search(name) for rx in patterns) or \
                (cfg.train_embeddings and "embed" in name):
            p.requires_grad_(True)
    if patterns and not any(rx.search(n) for rx in patterns for n, _ in model.named_parameters()):
        raise UserError(f"method.patterns {cfg.patterns} match no parameter of this model")
    return model


def merge(model: nn.Module, cfg: FreezeConfig) -> nn.Module:
    return model


METHOD = Method(name="freeze", summary="train the top N layers and/or regex-selected parameters",
                config_cls=FreezeConfig, inject=inject, merge=merge, validate=validate)
