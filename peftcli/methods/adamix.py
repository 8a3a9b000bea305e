"""AdaMix (Wang et al. 2022): several adapter or LoRA experts per site, stochastic routing, averaged for inference."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config.schema import field, non_negative, positive
from . import bottleneck as bn
from .adapter import UNMERGEABLE
from .lora import DEFAULT_TARGETS
from .registry import Method, match_targets, target_error
from ..models.modules import replace_module

# Sec. 3.2: every training step runs the whole model twice, each pass on its own random routes, and adds the
# weighted symmetric KL between the two output distributions (MSE for a regression head) to the first pass's
# task loss. It needs the logits, so causal-LM training computes them (model.chunked_loss is off).
CONSISTENCY_DOC = ("weight of the consistency loss: symmetric KL between two forward passes on different random "
                   "routes (Sec. 3.2; doubles the training forward, turns model.chunked_loss off); 0 = off")


@dataclasses.dataclass
class AdaMixConfig:
    # Wang et al. 2022, Sec. 4.1: 4 adaptation modules per site, adapter bottleneck 16.
    num_experts: int = field(4, check=positive, doc="experts per adapter site")
    bottleneck_size: int = field(16, check=positive, doc="bottleneck width of every expert")
    nonlinearity: str = field("relu", check=bn.check_activation, doc="activation between down and up projection")
    consistency_weight: float = field(1.0, check=non_negative, doc=CONSISTENCY_DOC)


@dataclasses.dataclass
class AdaMixLoraConfig:
    num_experts: int = field(4, check=positive, doc="LoRA experts per target layer")
    r: int = field(8, check=positive, doc="rank of every expert")
    alpha: float = field(16.0, check=positive, doc="scale numerator: update = (alpha / r) · B·A")
    target_modules: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS),
                                            doc="name suffixes, a regex, or all-linear")
    consistency_weight: float = field(1.0, check=non_negative, doc=CONSISTENCY_DOC)


class Experts(nn.Module):
    """Stacked down/up projections of M experts; subclasses define `project(x, down, up)`. Training: each forward routes through one random down and one
    random up expert (Sec. 3.2); inference: through their averages (Sec. 3.4), so it costs one adapter.

    `peft_consistency_weight` asks the trainer for the two-pass consistency loss (consistency.py); each of
    those passes calls forward, so each draws its own routes."""

    def __init__(self, m: int, dim_in: int, size: int, dim_out: int, device, consistency: float):
        super().__init__()
        self.down_weight = nn.Parameter(torch.empty(m, size, dim_in, device=device))
        self.up_weight = nn.Parameter(torch.empty(m, dim_out, size, device=device))
        self.peft_consistency_weight = consistency

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.project(x, self.down_weight.mean(0), self.up_weight.mean(0))
        down, up = self.route()
        return self.project(x, self.down_weight[down], self.up_weight[up])

    def route(self) -> tuple[int, int]:
        """The down and up expert of this training forward, drawn independently and uniformly (Sec. 3.2)."""
        down, up = torch.randint(self.down_weight.shape[0], (2,)).tolist()
        return down, up


class AdapterExperts(Experts):
    def __init__(self, m, dim, size, nonlinearity, device, consistency):
        super().__init__(m, dim, size, dim, device, consistency)
        self.act = bn.activations()[nonlinearity]
        std = bn.INIT_STD
        for w in (self.down_weight, self.up_weight):
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)  # near identity, as Houlsby (Sec. 3.6)

    def project(self, x, down, up):
        return F.linear(self.act(F.linear(x.float(), down)), up)

    def averaged(self) -> bn.Bottleneck:
        """The single adapter inference runs: a plain Bottleneck with the experts' mean weights (no biases)."""
        size, dim = self.down_weight.shape[1:]
        plain = bn.Bottleneck(dim, size, "relu", self.down_weight.device)
        plain.act = self.act
        with torch.no_grad():
            plain.down.weight.copy_(self.down_weight.mean(0))
            plain.up.weight.copy_(self.up_weight.mean(0))
        return plain


def inject(model: nn.Module, cfg: AdaMixConfig) -> nn.Module:
    drop = bn.DropState()
    for site in bn.find_sites(model):
        dim = bn.hidden_size(model, site)
        for where in ("attention", "ffn"):  # Houlsby placement (Wang et al. 2022, Sec. 3.1)
            device = model.get_submodule(site.ffn_out).weight.device
            experts = AdapterExperts(cfg.num_experts, dim, cfg.bottleneck_size, cfg.nonlinearity, device,
                                     cfg.consistency_weight)
            bn.attach(model, site, where, experts, parallel=False, scale=1.0, drop=drop)
    return model


class LoraExperts(Experts):
    def __init__(self, base: nn.Linear, m: int, r: int, scale: float, consistency: float):
        super().__init__(m, base.in_features, r, base.out_features, base.weight.device, consistency)
        for i in range(m):
            nn.init.kaiming_uniform_(self.down_weight.data[i], a=math.sqrt(5))
        nn.init.zeros_(self.up_weight)  # every expert starts as a zero update (LoRA Sec. 4.1)
        self.scale = scale

    def project(self, x, down, up):
        return F.linear(F.linear(x.float(), down), up) * self.scale


class AdaMixLoraLinear(nn.Linear):
    """A frozen linear layer (weight/bias keep their names) plus `adamix` LoRA experts beside it."""

    def __init__(self, base: nn.Linear, experts: LoraExperts):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias, self.adamix = base.weight, base.bias, experts

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.adamix(x).to(x.dtype)

    def merged(self) -> nn.Linear:
        """The averaged expert folded in: W + scale · mean(B) · mean(A)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        e = self.adamix
        delta = (e.up_weight.mean(0) @ e.down_weight.mean(0)) * e.scale
        with torch.no_grad():
            plain.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def inject_lora(model: nn.Module, cfg: AdaMixLoraConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        from ..errors import UserError

        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    for name in names:
        base = model.get_submodule(name)
        experts = LoraExperts(base, cfg.num_experts, cfg.r, cfg.alpha / cfg.r, cfg.consistency_weight)
        replace_module(model, name, AdaMixLoraLinear(base, experts))
    return model


def merge_lora(model: nn.Module, cfg: AdaMixLoraConfig) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaMixLoraLinear):
            replace_module(model, name, module.merged())
    return model


PAPER = "Wang et al. 2022, AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning"
METHOD = Method(
    name="adamix", summary="mixture of adapter experts, stochastic routing, averaged into one adapter",
    config_cls=AdaMixConfig, inject=inject, merge=None, paper=PAPER,
    merge_hint=UNMERGEABLE + "; inference already runs the single averaged adapter")
LORA_METHOD = Method(
    name="adamix_lora", summary="mixture of LoRA experts, averaged and merged into the weights",
    config_cls=AdaMixLoraConfig, inject=inject_lora, merge=merge_lora, paper=PAPER)
