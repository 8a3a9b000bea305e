"""UniPELT (Mao et al. 2022): LoRA, prefix tuning and a bottleneck adapter, each behind a learned gate."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..config.schema import field, positive
from . import bottleneck as bn
from .lora import DEFAULT_TARGETS
from .prefix import PrefixLayer, install_prefix
from .prefix_tuning import PrefixEncoder, plain_prefixes
from .registry import Method, match_targets, target_error
from ..models.modules import replace_module
from .signatures import cache_argument, require_hidden_states_first


@dataclasses.dataclass
class UniPeltConfig:
    # Mao et al. 2022, Sec. 4.1: LoRA rank 8 on query/value, prefix length 10, adapter bottleneck 48.
    lora_r: int = field(8, check=positive, doc="rank of the gated LoRA update")
    lora_alpha: float = field(16.0, check=positive, doc="LoRA scale numerator (alpha / r)")
    lora_targets: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS), doc="layers that get gated LoRA")
    prefix_length: int = field(10, check=positive, doc="prefix tokens per attention layer")
    prefix_hidden_size: int = field(512, check=positive, doc="hidden width of the prefix reparameterisation MLP")
    bottleneck_size: int = field(48, check=positive, doc="bottleneck width of the gated FFN adapter")
    nonlinearity: str = field("relu", check=bn.check_activation, doc="activation inside the adapter")


def gate(dim: int, device) -> nn.Linear:
    """A gate sigma(W x + b) in (0, 1) from a submodule's input (Mao et al. 2022, Sec. 3, Fig. 1)."""
    return nn.Linear(dim, 1, device=device)


class GatedLoraLinear(nn.Linear):
    """Frozen linear layer (weight/bias keep their names) + gate(x) · (alpha/r) · B·A x."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias, self.scale = base.weight, base.bias, scale
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_gate = gate(self.in_features, device)

    def forward(self, x):
        h = x.float()
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale * torch.sigmoid(self.lora_gate(h))
        return F.linear(x, self.weight, self.bias) + update.to(x.dtype)


class GatedAdapter(nn.Module):
    """gate(h) · adapter(h) on the FFN output (Pfeiffer placement)."""

    def __init__(self, dim: int, size: int, nonlinearity: str, device):
        super().__init__()
        self.bottleneck = bn.Bottleneck(dim, size, nonlinearity, device)
        self.gate = gate(dim, device)

    def forward(self, h):
        return torch.sigmoid(self.gate(h.float())) * self.bottleneck(h)


class PrefixGate(nn.Module):
    """Scales one layer's prefix keys and values by a gate read from the layer's first token (the [CLS] or BOS
    token every position can see, so decoders stay causal)."""

    def __init__(self, dim: int, layer: int, tokens: int, cache_name: str, device):
        super().__init__()
        self.gate, self.layer, self.tokens, self.cache_name = gate(dim, device), layer, tokens, cache_name

    def __call__(self, module, args, kwargs):
        cache = kwargs.get(self.cache_name)
        if cache is None or self.layer >= len(cache.layers):
            # The prefix hook always hands the attention a cache with one entry per layer: without it the
            # gated prefix would silently do nothing.
            raise UserError(f"method.name: unipelt's prefix gate of layer {self.layer} found no key/value cache "
                            f"in {type(module).__name__}'s `{self.cache_name}` argument; install the tested "
                            f"versions (pip install -c constraints.txt -e .)")
        entry, x = cache.layers[self.layer], (args[0] if args else kwargs["hidden_states"])
        g = torch.sigmoid(self.gate(x[:, 0].float())).view(-1, 1, 1, 1)
        if isinstance(entry, PrefixLayer):  # training/scoring: the prefix is re-gated at every forward
            keys, values = entry.__dict__.setdefault("ungated", (entry.keys, entry.values))
            entry.keys, entry.values = (keys * g).to(keys.dtype), (values * g).to(values.dtype)
        elif entry.keys.shape[-2] == self.tokens and not getattr(entry, "gated", False):  # generation prefill
            entry.keys, entry.values, entry.gated = (entry.keys * g).to(entry.keys.dtype), \
                (entry.values * g).to(entry.values.dtype), True


def inject(model: nn.Module, cfg: UniPeltConfig) -> nn.Module:
    names = match_targets(model, cfg.lora_targets)
    if not names:
        raise UserError(f"method.lora_{target_error(model, cfg.lora_targets)}")
    for name in names:
        replace_module(model, name, GatedLoraLinear(model.get_submodule(name), cfg.lora_r, cfg.lora_alpha / cfg.lora_r))
    install_prefix(model, PrefixEncoder(model, cfg.prefix_length, cfg.prefix_hidden_size), "prefix_encoder", "unipelt")
    drop = bn.DropState()
    for site in bn.find_sites(model):
        dim, device = bn.hidden_size(model, site), model.get_submodule(site.ffn_out).weight.device
        bn.attach(model, site, "ffn", GatedAdapter(dim, cfg.bottleneck_size, cfg.nonlinearity, device),
                  parallel=False, scale=1.0, drop=drop)
        attention = model.get_submodule(site.attn_in)
        require_hidden_states_first(attention, "unipelt")
        prefix_gate = PrefixGate(dim, site.layer, cfg.prefix_length, cache_argument(attention, "unipelt"), device)
        attention.add_module("prefix_gate", prefix_gate)
        attention.register_forward_pre_hook(prefix_gate, with_kwargs=True)
    return model


METHOD = Method(
    name="unipelt", summary="gated LoRA + gated prefix tuning + gated bottleneck adapter",
    config_cls=UniPeltConfig, inject=inject, merge=None, extra_state=plain_prefixes("prefix_encoder"),
    merge_hint="its gates depend on the input and it adds prefixes and a nonlinear adapter; nothing folds",
    tasks=frozenset({"sequence-classification", "causal-lm", "token-classification"}),
    paper="Mao et al. 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning")
