"""Full fine-tuning: every parameter trains. The baseline every results table needs."""
from __future__ import annotations

import dataclasses

from torch import nn

from .registry import Method


@dataclasses.dataclass
class FullConfig:
    pass


def inject(model: nn.Module, cfg: FullConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge(model: nn.Module, cfg: FullConfig) -> nn.Module:
    return model


METHOD = Method(name="full", summary="plain fine-tuning of all parameters", config_cls=FullConfig,
                inject=inject, merge=merge)
