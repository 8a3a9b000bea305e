"""IA3 (Liu et al. 2022): learned vectors rescaling keys, values and the FFN's inner activations."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..config.schema import field
from .registry import Method, match_targets, target_error
from ..models.modules import replace_module

# Keys and values of attention plus the FFN's down projection (Liu et al. 2022, Sec. 3.3: l_k, l_v, l_ff),
# under BERT, Llama/Mistral and OPT/GPT-J names. BERT's FFN output is `layer.N.output.dense`, not the
# attention's `attention.output.dense`, hence a regex.
_FFN = r".*\.(down_proj|fc2|fc_out)|.*\.layer\.\d+\.output\.dense"
DEFAULT_TARGETS = rf".*\.(key|value|k_proj|v_proj)|{_FFN}"


@dataclasses.dataclass
class Ia3Config:
    target_modules: list[str] | str = field(DEFAULT_TARGETS, doc="layers to rescale: name suffixes or a regex")
    feedforward_modules: list[str] | str = field(
        _FFN, doc="which targets are FFN down projections (their input is rescaled; others their output)")


class Ia3Linear(nn.Linear):
    """nn.Linear keeping its weight/bias names, with a trained fp32 vector `ia3_l` initialised to ones (Sec. 3.3).
    Attention targets: y = l ⊙ (x Wᵀ + b), shape (out, 1). FFN targets: y = (l ⊙ x) Wᵀ + b, shape (1, in).
    Shapes and the bias handling follow HF peft's IA3 so exported adapters load there unchanged."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return F.linear(x * self.ia3_l.flatten().to(x.dtype), self.weight, self.bias)
        out = F.linear(x, self.weight, self.bias)
        return out * self.ia3_l.flatten().to(out.dtype)

    def merged(self) -> nn.Linear:
        """Fold l into the weight rows (attention) or columns (FFN) in fp32; attention also scales the bias."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_((self.weight.float() * self.ia3_l.float()).to(self.weight.dtype))
            if self.bias is not None:
                scale = 1.0 if self.feedforward else self.ia3_l.float().flatten()
                plain.bias.copy_((self.bias.float() * scale).to(self.bias.dtype))
        return plain

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scales={'input' if self.feedforward else 'output'}"


def inject(model: nn.Module, cfg: Ia3Config) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    feedforward = set(match_targets(model, cfg.feedforward_modules))
    for name in names:
        replace_module(model, name, Ia3Linear(model.get_submodule(name), name in feedforward))
    return model


def merge(model: nn.Module, cfg: Ia3Config) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, Ia3Linear):
            replace_module(model, name, module.merged())
    return model


METHOD = Method(
    name="ia3", summary="learned rescaling of keys, values and FFN activations", config_cls=Ia3Config,
    inject=inject, merge=merge,
    paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning")
