"""LoRA (Hu et al. 2021) and its options: rsLoRA, DoRA, PiSSA init, per-module rank/alpha, embedding/Conv1D targets."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UserError
from ..config.schema import field, open_fraction, positive
from .lora_layers import LoraConv1D, LoraEmbedding, LoraLinear
from .registry import Method, match_targets, target_error
from ..models.modules import replace_module

__all__ = ["DEFAULT_TARGETS", "LoraConfig", "LoraLinear", "LoraConv1D", "LoraEmbedding", "lora_scale",
           "module_rank_alpha", "METHOD"]

# Attention query/value projections, the LoRA paper's choice (Sec. 7.1), under their common HF names.
DEFAULT_TARGETS = ["query", "value", "q_proj", "v_proj", "c_attn"]
# Layer kinds LoRA can adapt; `all-linear` takes the first two (embeddings must be named).
TARGET_KINDS = (nn.Linear, Conv1D, nn.Embedding)


def _positive_values(mapping: dict) -> str | None:
    bad = [k for k, v in mapping.items() if v <= 0]
    return f"values must be > 0; {bad[0]!r} maps to {mapping[bad[0]]}" if bad else None


@dataclasses.dataclass
class LoraConfig:
    r: int = field(8, check=positive, doc="rank of the update")
    alpha: float = field(16.0, check=positive, doc="scale numerator: update = (alpha / r) · B·A")
    dropout: float = field(0.0, check=open_fraction, doc="dropout on the adapter's input (linear layers)")
    target_modules: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS),
                                            doc="name suffixes, a regex, or all-linear; embeddings by name")
    use_rslora: bool = field(False, doc="rsLoRA: scale alpha / sqrt(r) (Kalajdzievski 2023)")
    use_dora: bool = field(False, doc="DoRA: trained per-output magnitude x normalised W + B·A (Liu et al. 2024)")
    init: Literal["default", "pissa"] = field(
        "default", doc="default: random A, B = 0; pissa: A, B from W's top-r singular vectors (Meng et al. 2024)")
    rank_pattern: dict[str, int] = field(factory=dict, check=_positive_values,
                                         doc="regex -> rank for the modules it matches (name or dotted suffix)")
    alpha_pattern: dict[str, float] = field(factory=dict, check=_positive_values,
                                            doc="regex -> alpha for the modules it matches (name or dotted suffix)")


def validate(cfg: LoraConfig) -> str | None:
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(cfg, key):
            try:
                re.compile(pattern)
            except re.error as exc:
                return f"{key}: {pattern!r} is not a valid regex ({exc}); write e.g. 'layer\\.0\\..*query'"
    return None


def pattern_value(patterns: dict, name: str, default):
    """The value of the first pattern matching `name` whole or a dotted suffix of it (HF peft's convention)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name):
            return value
    return default


def module_rank_alpha(cfg: LoraConfig, name: str) -> tuple[int, float]:
    return pattern_value(cfg.rank_pattern, name, cfg.r), pattern_value(cfg.alpha_pattern, name, cfg.alpha)


def lora_scale(cfg: LoraConfig, r: int | None = None, alpha: float | None = None) -> float:
    r, alpha = r or cfg.r, alpha or cfg.alpha
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r  # rsLoRA, Kalajdzievski 2023, Sec. 3


def target_names(model: nn.Module, targets) -> list[str]:
    if targets == "all-linear":
        return match_targets(model, targets, kinds=(nn.Linear, Conv1D))
    return match_targets(model, targets, kinds=TARGET_KINDS)


def _check_patterns(cfg: LoraConfig, names: list[str]) -> None:
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(cfg, key):
            if not any(pattern_value({pattern: 1}, n, None) for n in names):
                raise UserError(f"method.{key}: {pattern!r} matches none of the {len(names)} targeted modules "
                                f"(e.g. {names[0]}); fix the regex or remove it")


def _check_embedding(model: nn.Module, name: str, cfg: LoraConfig) -> None:
    if cfg.use_dora or cfg.init == "pissa":
        option = "use_dora" if cfg.use_dora else "init: pissa"
        raise UserError(f"method.target_modules: {name} is an embedding; {option} applies to linear layers only: "
                        f"drop the embedding from target_modules")
    weight = model.get_submodule(name).weight
    if sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        raise UserError(f"method.target_modules: {name} shares its weight with the output layer (tied "
                        f"embeddings), so its update could not be merged; drop it from target_modules")


def wrap(model: nn.Module, name: str, cfg: LoraConfig) -> nn.Module:
    base = model.get_submodule(name)
    r, alpha = module_rank_alpha(cfg, name)
    scale = lora_scale(cfg, r, alpha)
    if isinstance(base, nn.Embedding):
        _check_embedding(model, name, cfg)
        return LoraEmbedding(base, r, scale)
    if r > min(base.weight.shape) and cfg.init == "pissa":
        raise UserError(f"method.r: PiSSA needs r <= min(in, out) = {min(base.weight.shape)} for {name}; lower r")
    layer = (LoraConv1D if isinstance(base, Conv1D) else LoraLinear)(base, r, scale, cfg.dropout)
    if cfg.init == "pissa":
        layer.pissa_init()
    if cfg.use_dora:  # after PiSSA, so the magnitude is that of the residual plus the adapter (= W)
        layer.enable_dora()
    return layer


def inject(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    names = target_names(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules, TARGET_KINDS)}")
    _check_patterns(cfg, names)
    for name in names:
        replace_module(model, name, wrap(model, name, cfg))
    return model


def merge(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoraLinear, LoraEmbedding)):
            replace_module(model, name, module.merged())
    return model


METHOD = Method(
    name="lora", summary="low-rank update B·A beside frozen layers (rsLoRA, DoRA, PiSSA options)",
    config_cls=LoraConfig, inject=inject, merge=merge, validate=validate,
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models; Liu et al. 2024, DoRA; "
          "Meng et al. 2024, PiSSA")
