"""Parallel adapters (He et al. 2022) and AdaptFormer (Chen et al. 2022): a scaled bottleneck beside the FFN."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..config.schema import field, non_negative, positive
from . import bottleneck as bn
from .adapter import UNMERGEABLE, check_placement
from .registry import Method


@dataclasses.dataclass
class ParallelAdapterConfig:
    # He et al. 2022, Sec. 4.6: the FFN parallel adapter of their best setting has r = 512 and s = 4 (Sec. 4.5).
    bottleneck_size: int | None = field(512, check=positive, doc="bottleneck width r")
    reduction_factor: int | None = field(None, check=positive, doc="bottleneck = hidden / this (instead of size)")
    scale: float = field(4.0, check=positive, doc="s in h + s·adapter(x); the initial value when learned")
    learn_scale: bool = field(False, doc="train s (one scalar per adapter) instead of keeping it fixed")
    nonlinearity: str = field("relu", check=bn.check_activation, doc="activation between down and up projection")
    placement: list[Literal["attention", "ffn"]] = field(
        factory=lambda: ["ffn"], check=check_placement, doc="sublayers the adapter runs beside")
    drop_train_layers: int | None = field(0, check=non_negative, doc="AdapterDrop: each step skip the adapters "
                                          "of the lowest n ~ U{0..this} layers; null = all but the top; 0 = off")
    drop_inference_layers: int = field(0, check=non_negative, doc="AdapterDrop: at inference skip the adapters "
                                       "of the lowest N layers (faster)")


@dataclasses.dataclass
class AdaptFormerConfig(ParallelAdapterConfig):
    # Chen et al. 2022 (AdaptFormer), Sec. 4.1: middle dimension 64 and scaling factor s = 0.1.
    bottleneck_size: int | None = field(64, check=positive, doc="bottleneck width (AdaptFormer Sec. 4.1: 64)")
    scale: float = field(0.1, check=positive, doc="s in h + s·adapter(x) (AdaptFormer Sec. 4.1: 0.1)")


def validate(cfg: ParallelAdapterConfig) -> str | None:
    if cfg.bottleneck_size and cfg.reduction_factor:
        return "set bottleneck_size or reduction_factor, not both (bottleneck_size: null to use the factor)"
    return None


def inject(model: nn.Module, cfg: ParallelAdapterConfig) -> nn.Module:
    sites = bn.find_sites(model)
    drop = bn.DropState(cfg.drop_inference_layers)
    for site in sites:
        dim = bn.hidden_size(model, site)
        size = bn.bottleneck_size(dim, cfg.bottleneck_size, cfg.reduction_factor, dim)
        device = model.get_submodule(site.ffn_out).weight.device
        for where in cfg.placement:
            adapter = bn.Bottleneck(dim, size, cfg.nonlinearity, device, zero_up=True)
            scale = (nn.Parameter(torch.tensor(cfg.scale, device=device)) if cfg.learn_scale else cfg.scale)
            bn.attach(model, site, where, adapter, parallel=True, scale=scale, drop=drop)
    return model


METHOD = Method(
    name="parallel_adapter", summary="scaled bottleneck adapter in parallel with the FFN (and optionally attention)",
    config_cls=ParallelAdapterConfig, inject=inject, merge=None, merge_hint=UNMERGEABLE, validate=validate,
    callbacks=bn.drop_callbacks,
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning")

ADAPTFORMER = dataclasses.replace(
    METHOD, name="adaptformer", config_cls=AdaptFormerConfig,
    summary="AdaptFormer: parallel FFN adapter, bottleneck 64, fixed scale 0.1",
    paper="Chen et al. 2022, AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition")
