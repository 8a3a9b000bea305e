"""VeRA (Kopiczko et al. 2024): one frozen random pair A, B shared by all layers, with trained scaling vectors d, b."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..config.schema import field, non_negative, open_fraction, positive
from .registry import Method, match_targets, target_error
from ..models.modules import replace_module

# Query and value projections, where the paper applies VeRA (Sec. 4.1).
DEFAULT_TARGETS = ["query", "value", "q_proj", "v_proj"]
PROJECTION = "vera_projection"  # the model attribute holding the shared A, B


@dataclasses.dataclass
class VeraConfig:
    r: int = field(256, check=positive, doc="rank of the shared random matrices (cheap: only d grows with r)")
    target_modules: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS),
                                            doc="name suffixes, a regex, or all-linear")
    d_initial: float = field(0.1, check=positive, doc="initial value of every d (0.1, as in the paper)")
    dropout: float = field(0.0, check=open_fraction, doc="dropout on the adapter's input")
    projection_seed: int = field(0, check=non_negative, doc="seed of the shared random A, B")


class VeraProjection(nn.Module):
    """The shared frozen A (r, max_in) and B (max_out, r), Kaiming-uniform from `seed` (Sec. 3). Layers slice
    them to their own shape (Sec. 3: one pair of the largest size). They are persistent buffers, saved with
    every run as extra state, so a reloaded run never depends on the random generator reproducing them."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, device):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("vera_A", _kaiming_uniform((r, max_in), generator).to(device))
        self.register_buffer("vera_B", _kaiming_uniform((max_out, r), generator).to(device))


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # gain sqrt(2), fan_in = columns
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraLinear(nn.Linear):
    """y = x Wᵀ + bias + b ⊙ (B (d ⊙ (A x))), with A, B slices of the shared projection; d starts at d_initial
    and b at zero, so the layer starts as the base layer (Sec. 3)."""

    def __init__(self, base: nn.Linear, projection: VeraProjection, r: int, d_initial: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self._projection = (projection,)  # a tuple, so the shared module is not registered once per layer
        device = base.weight.device
        self.vera_lambda_d = nn.Parameter(torch.full((r,), d_initial, device=device, dtype=torch.float32))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout)

    def shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        projection = self._projection[0]
        return projection.vera_A[:, :self.in_features], projection.vera_B[:self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        a, b = self.shared()
        low = F.linear(self.dropout(x).to(a.dtype), a) * self.vera_lambda_d
        return out + (F.linear(low, b) * self.vera_lambda_b).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.shared()
        return (self.vera_lambda_b.float()[:, None] * b.float()) @ (self.vera_lambda_d.float()[:, None] * a.float())

    def merged(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def inject(model: nn.Module, cfg: VeraConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    bases = {name: model.get_submodule(name) for name in names}
    device = next(iter(bases.values())).weight.device
    projection = VeraProjection(cfg.r, max(m.in_features for m in bases.values()),
                                max(m.out_features for m in bases.values()), cfg.projection_seed, device)
    setattr(model, PROJECTION, projection)
    for name, base in bases.items():
        replace_module(model, name, VeraLinear(base, projection, cfg.r, cfg.d_initial, cfg.dropout))
    return model


def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{PROJECTION}.{k}": v for k, v in getattr(model, PROJECTION).state_dict().items()}


def merge(model: nn.Module, cfg: VeraConfig) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, VeraLinear):
            replace_module(model, name, module.merged())
    delattr(model, PROJECTION)
    return model


METHOD = Method(
    name="vera", summary="shared frozen random A, B with trained per-layer scaling vectors d, b",
    config_cls=VeraConfig, inject=inject, merge=merge, extra_state=extra_state,
    paper="Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation")
