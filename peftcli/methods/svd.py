"""Low-rank SVD compression: chosen base weights become rank-k factors U_k·S_k·V_kᵀ, optionally with LoRA on top."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field, non_negative, positive
from .registry import Method, MethodCallback, match_targets, target_error
from ..models.modules import replace_module

logger = logging.getLogger("peftcli")
REPORT_FILE = "svd.json"


@dataclasses.dataclass
class SvdConfig:
    rank: int | None = field(None, check=positive, doc="keep this many singular values per layer (or use energy)")
    energy: float = field(0.9, check=lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}",
                          doc="when rank is unset: smallest rank keeping this fraction of Σσ²")
    # Feed-forward layers under their common HF names (BERT, Llama, ViT/OPT); BERT's "output.dense" suffix also
    # matches attention.output.dense: use a regex to leave it out (see recipes/glue/sst2-svd.yaml).
    target_modules: list[str] | str = field(factory=lambda: ["intermediate.dense", "output.dense", "gate_proj",
                                                             "up_proj", "down_proj", "fc1", "fc2"],
                                            doc="layers to compress: name suffixes, a regex, or all-linear")
    lora_r: int = field(8, check=non_negative, doc="rank of a LoRA update on the compressed layer (0 = none)")
    lora_alpha: float = field(16.0, check=positive, doc="LoRA scale numerator: alpha / lora_r")


def rank_for(weight: torch.Tensor, cfg: SvdConfig) -> int:
    full = min(weight.shape)
    if cfg.rank is not None or weight.is_meta:
        return min(cfg.rank or full, full)
    sigma = torch.linalg.svdvals(weight.float())
    energy = torch.cumsum(sigma ** 2, 0) / (sigma ** 2).sum()
    return int(torch.searchsorted(energy, torch.tensor(cfg.energy, dtype=energy.dtype)).item()) + 1


class SvdLinear(nn.Module):
    """y = x·Vᵀ·Uᵀ + b (+ scale · x·Aᵀ·Bᵀ). U (out×k) carries the singular values; both factors are frozen and
    recomputed from the base weight on inject (torch.linalg.svd), so only LoRA and the head are saved."""

    def __init__(self, base: nn.Linear, cfg: SvdConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight
        k = rank_for(weight, cfg)
        if weight.is_meta:
            u, v = torch.empty(weight.shape[0], k, device="meta"), torch.empty(k, weight.shape[1], device="meta")
        else:
            u_full, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            u, v = u_full[:, :k] * s[:k], vh[:k]
        self.svd_U = nn.Parameter(u.to(weight.dtype), requires_grad=False)
        self.svd_V = nn.Parameter(v.to(weight.dtype), requires_grad=False)
        self.bias = base.bias
        self.lora_A = self.lora_B = None
        if cfg.lora_r:
            device = weight.device
            self.lora_A = nn.Parameter(torch.empty(cfg.lora_r, self.in_features, device=device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.lora_r, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: starts at the compressed model
            self.scale = cfg.lora_alpha / cfg.lora_r

    @property
    def rank(self) -> int:
        return self.svd_V.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.svd_V.T.to(x.dtype)) @ self.svd_U.T.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.lora_A is not None:
            y = y + ((x.float() @ self.lora_A.T) @ self.lora_B.T * self.scale).to(x.dtype)
        return y

    def dense_weight(self) -> torch.Tensor:
        weight = self.svd_U.float() @ self.svd_V.float()
        if self.lora_A is not None:
            weight = weight + (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return weight

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding the rank-k weight (+ LoRA), computed in fp32."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.svd_U.device, dtype=self.svd_U.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.dense_weight().to(plain.weight.dtype))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def svd_modules(model: nn.Module) -> dict[str, SvdLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SvdLinear)}


def inject(model: nn.Module, cfg: SvdConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    for name in names:
        replace_module(model, name, SvdLinear(model.get_submodule(name), cfg))
    return model


def merge(model: nn.Module, cfg: SvdConfig) -> nn.Module:
    for name, module in list(svd_modules(model).items()):
        replace_module(model, name, module.merged())
    return model


def compression_report(model: nn.Module) -> dict:
    """Weights of the compressed layers before and after: out·in vs k·(out+in) (+ LoRA's r·(out+in))."""
    layers, dense, factored = {}, 0, 0
    for name, m in svd_modules(model).items():
        before = m.in_features * m.out_features
        after = m.rank * (m.in_features + m.out_features)
        layers[name] = {"rank": m.rank, "full_rank": min(m.in_features, m.out_features), "params": after}
        dense, factored = dense + before, factored + after
    total = sum(p.numel() for p in model.parameters() if not _is_lora(p, model))
    return {"compressed_layers": len(layers), "dense_params": dense, "factored_params": factored,
            "compression_ratio": dense / factored if factored else 1.0,
            "model_params_before": total - factored + dense, "model_params_after": total, "layers": layers}


def _is_lora(param: nn.Parameter, model: nn.Module) -> bool:
    return any(param is m.lora_A or param is m.lora_B for m in svd_modules(model).values())


class ReportCallback(MethodCallback):
    """Writes svd.json (ranks and compression ratio) into the run directory at the start of training."""

    def __init__(self, model: nn.Module):
        self.model = model

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from ..files import atomic_write

            report = compression_report(self.model)
            if report["compression_ratio"] < 1:
                logger.warning("svd: the factors hold more weights than the dense layers (ratio %.2f); lower "
                               "method.energy or set method.rank", report["compression_ratio"])
            atomic_write(os.path.join(args.output_dir, REPORT_FILE), json.dumps(report, indent=2))


METHOD = Method(
    name="svd", summary="rank-k SVD compression of chosen base weights, optionally with LoRA on top",
    config_cls=SvdConfig, inject=inject, merge=merge,
    callbacks=lambda cfg, model: [ReportCallback(model)],
    paper="truncated SVD (Eckart-Young); low-rank compression as in Denton et al. 2014")
