"""LoRA (Hu et al. 2021): a trainable low-rank update B·A beside each frozen target linear layer."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..schema import field, open_fraction, positive
from .registry import Method, match_targets, replace_module, target_error

# Attention query/value projections, the LoRA paper's choice (Sec. 7.1), under their common HF names.
DEFAULT_TARGETS = ["query", "value", "q_proj", "v_proj", "c_attn"]


@dataclasses.dataclass
class LoraConfig:
    r: int = field(8, check=positive, doc="rank of the update")
    alpha: float = field(16.0, check=positive, doc="scale numerator: update = (alpha / r) · B·A")
    dropout: float = field(0.0, check=open_fraction, doc="dropout on the adapter's input")
    target_modules: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS),
                                            doc="name suffixes, a regex, or all-linear")
    use_rslora: bool = field(False, doc="rsLoRA: scale alpha / sqrt(r) (Kalajdzievski 2023)")


def lora_scale(cfg: LoraConfig) -> float:
    return cfg.alpha / math.sqrt(cfg.r) if cfg.use_rslora else cfg.alpha / cfg.r


class LoraLinear(nn.Linear):
    """nn.Linear whose frozen weight/bias keep their names, plus fp32 `lora_A`/`lora_B`.
    Keeping the base parameter names means the injected model's state_dict is the base's plus lora keys,
    and merging gives back exactly the base layout."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        # Master weights stay fp32 whatever the base dtype; forward casts them to the compute dtype.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0 makes the update start at zero (Sec. 4.1)
        self.scale, self.dropout_p = scale, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import lora_linear

        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, self.dropout_p,
                           self.training)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded in (computed in fp32, cast to the base dtype)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.lora_A.shape[0]}, scale={self.scale:g}"


def inject(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        from ..errors import UserError

        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    for name in names:
        base = model.get_submodule(name)
        replace_module(model, name, LoraLinear(base, cfg.r, lora_scale(cfg), cfg.dropout))
    return model


def merge(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            replace_module(model, name, module.merged())
    return model


METHOD = Method(
    name="lora", summary="low-rank update B·A beside frozen linear layers", config_cls=LoraConfig,
    inject=inject, merge=merge, paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models")
