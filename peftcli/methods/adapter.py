"""Serial bottleneck adapters: Houlsby (2019) and Pfeiffer (2021) placements, and AdapterDrop (Rücklé 2021)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from ..config.schema import field, non_negative, positive
from . import bottleneck as bn
from .registry import Method

# Houlsby et al. 2019, Sec. 3.2 sweeps bottleneck sizes {8, 64, 256} on GLUE; 64 is the middle setting.
HOULSBY_SIZE = 64
# Pfeiffer et al. 2021 (AdapterFusion) use one adapter per layer after the FFN with reduction factor 16.
PFEIFFER_REDUCTION = 16
UNMERGEABLE = ("a bottleneck adapter has a nonlinearity between its projections, so it cannot be folded into the "
               "base weights")


def check_placement(value) -> str | None:
    return None if value and len(set(value)) == len(value) else "must list attention and/or ffn, each once"


@dataclasses.dataclass
class AdapterConfig:
    variant: Literal["houlsby", "pfeiffer"] = field(
        "houlsby", doc="houlsby: after attention and FFN, norms trained; pfeiffer: after the FFN only")
    bottleneck_size: int | None = field(None, check=positive, doc="bottleneck width m; default 64 (houlsby) or "
                                        "hidden/16 (pfeiffer)")
    reduction_factor: int | None = field(None, check=positive, doc="bottleneck = hidden / this (instead of size)")
    nonlinearity: str = field("relu", check=bn.check_activation, doc="activation between down and up projection")
    placement: list[Literal["attention", "ffn"]] | None = field(
        None, check=check_placement, doc="where adapters go; default by variant")
    train_norms: bool | None = field(None, doc="also train the blocks' norms; default true for houlsby (Sec. 2.1)")
    init_std: float = field(bn.INIT_STD, check=positive, doc="std of the near-identity init (Houlsby Sec. 3.6)")
    drop_train_layers: int | None = field(0, check=non_negative, doc="AdapterDrop: each step skip the adapters "
                                          "of the lowest n ~ U{0..this} layers; null = all but the top; 0 = off")
    drop_inference_layers: int = field(0, check=non_negative, doc="AdapterDrop: at inference skip the adapters "
                                       "of the lowest N layers (faster)")


@dataclasses.dataclass
class AdapterDropConfig(AdapterConfig):
    drop_train_layers: int | None = field(None, check=non_negative, doc="skip the adapters of the lowest "
                                          "n ~ U{0..this} layers each step; null = all but the top (Rücklé Sec. 3)")


def validate(cfg: AdapterConfig) -> str | None:
    if cfg.bottleneck_size and cfg.reduction_factor:
        return "set bottleneck_size or reduction_factor, not both"
    return None


def resolved(cfg: AdapterConfig, dim: int) -> tuple[int, list[str], bool]:
    """(bottleneck size, placement, train norms) with the variant's paper defaults filled in."""
    houlsby = cfg.variant == "houlsby"
    default = HOULSBY_SIZE if houlsby else max(1, dim // PFEIFFER_REDUCTION)
    size = bn.bottleneck_size(dim, cfg.bottleneck_size, cfg.reduction_factor, default)
    placement = cfg.placement or (["attention", "ffn"] if houlsby else ["ffn"])
    return size, placement, houlsby if cfg.train_norms is None else cfg.train_norms


def inject(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    sites = bn.find_sites(model)
    size, placement, train_norms = resolved(cfg, bn.hidden_size(model, sites[0]))
    drop = bn.DropState(cfg.drop_inference_layers)
    for site in sites:
        for where in placement:
            device = model.get_submodule(site.ffn_out).weight.device
            adapter = bn.Bottleneck(bn.hidden_size(model, site), size, cfg.nonlinearity, device, cfg.init_std)
            bn.attach(model, site, where, adapter, parallel=False, scale=1.0, drop=drop)
    if train_norms:
        bn.unfreeze_norms(model, sites)
    return model


def adapter_params(hidden: int, size: int) -> int:
    """Parameters of one adapter, biases included: 2md + d + m (Houlsby et al. 2019, Sec. 2.1)."""
    return 2 * size * hidden + hidden + size


METHOD = Method(
    name="adapter", summary="serial bottleneck adapters (Houlsby / Pfeiffer placement, optional AdapterDrop)",
    config_cls=AdapterConfig, inject=inject, merge=None, merge_hint=UNMERGEABLE, validate=validate,
    callbacks=bn.drop_callbacks,
    paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP; Pfeiffer et al. 2021, AdapterFusion")

DROP_METHOD = dataclasses.replace(
    METHOD, name="adapter_drop", config_cls=AdapterDropConfig,
    summary="bottleneck adapters trained with robust AdapterDrop; skip lower layers' adapters at inference",
    paper="Rücklé et al. 2021, AdapterDrop: On the Efficiency of Adapters in Transformers")
