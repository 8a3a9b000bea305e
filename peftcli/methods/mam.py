"""Mix-And-Match adapter (He et al. 2022): prefix tuning on attention plus a scaled parallel adapter on the FFN."""
from __future__ import annotations

import dataclasses

from torch import nn

from ..config.schema import field, positive
from . import bottleneck as bn
from .parallel_adapter import ParallelAdapterConfig
from .parallel_adapter import inject as inject_parallel
from .prefix import install_prefix
from .prefix_tuning import PrefixEncoder, plain_prefixes
from .registry import Method

MERGE_HINT = ("prefixes add keys and values and the adapter has a nonlinearity; neither folds into the weights")


@dataclasses.dataclass
class MamConfig:
    # He et al. 2022, Sec. 4.6: prefix length l = 30 at attention, parallel adapter r = 512 with s = 4 at the FFN.
    prefix_length: int = field(30, check=positive, doc="prefix tokens per attention layer")
    prefix_hidden_size: int = field(512, check=positive, doc="hidden width of the prefix reparameterisation MLP")
    bottleneck_size: int = field(512, check=positive, doc="bottleneck width of the FFN parallel adapter")
    scale: float = field(4.0, check=positive, doc="s in h + s·adapter(x)")
    nonlinearity: str = field("relu", check=bn.check_activation, doc="activation inside the adapter")


def inject(model: nn.Module, cfg: MamConfig) -> nn.Module:
    install_prefix(model, PrefixEncoder(model, cfg.prefix_length, cfg.prefix_hidden_size), "prefix_encoder", "mam")
    adapter = ParallelAdapterConfig(bottleneck_size=cfg.bottleneck_size, scale=cfg.scale,
                                    nonlinearity=cfg.nonlinearity, placement=["ffn"])
    return inject_parallel(model, adapter)


METHOD = Method(
    name="mam", summary="Mix-And-Match: prefix tuning on attention + scaled parallel adapter on the FFN",
    config_cls=MamConfig, inject=inject, merge=None, merge_hint=MERGE_HINT, extra_state=plain_prefixes("prefix_encoder"),
    tasks=frozenset({"sequence-classification", "causal-lm", "token-classification"}),
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning")
