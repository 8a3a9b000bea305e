"""Diff pruning (Guo et al. 2021): a task diff δ = z ⊙ w on frozen weights, L0-penalised with hard-concrete gates z
(Louizos et al. 2018), projected to a target density by magnitude at the end and saved sparse.

Saved form after projection: per layer `<layer>.diff_index` (int64 flat indices into the weight) and
`<layer>.diff_values` (fp32 δ at those indices); everything else of δ is zero."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..config.schema import field, non_negative
from .registry import Method, MethodCallback, match_targets, target_error
from ..models.modules import replace_module

logger = logging.getLogger("peftcli")
REPORT_FILE = "diff_pruning.json"
# Hard-concrete stretch interval and temperature: Louizos et al. 2018, Sec. 4 (γ=-0.1, ζ=1.1, β=2/3).
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0
# Gate logits after projection: sigmoid(±10)·(ζ-γ)+γ clamps to exactly 1 / 0, so the kept δ is exact.
OPEN, CLOSED = 10.0, -10.0


@dataclasses.dataclass
class DiffPruningConfig:
    target_modules: list[str] | str = field("all-linear", doc="weights that get a diff: suffixes, regex, all-linear")
    target_density: float = field(0.005, check=lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}",
                                  doc="fraction of δ kept nonzero after the final projection (0.5%: paper Sec. 5)")
    l0_weight: float = field(1.25e-7, check=non_negative, doc="λ of the expected-L0 penalty (paper Sec. 5: 1.25e-7)")
    init_log_alpha: float = field(5.0, doc="initial gate logit log α (gates start open)")
    finetune: float = field(0.25, check=lambda v: None if 0 <= v < 1 else f"must be in [0, 1), got {v}",
                            doc="fraction of steps after the projection that train the kept entries (Sec. 3.3)")


def hard_concrete(log_alpha: torch.Tensor, training: bool) -> torch.Tensor:
    """Sample z (training) or its deterministic estimate (eval), both in [0, 1] (Louizos et al. Eq. 10-13)."""
    if training:
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


class DiffLinear(nn.Module):
    """nn.Linear with frozen weight/bias under their own names plus a gated diff: W0 + z ⊙ diff_w."""

    def __init__(self, base: nn.Linear, cfg: DiffPruningConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        shape, device = base.weight.shape, base.weight.device
        self.diff_w = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))  # δ starts at zero
        self.diff_log_alpha = nn.Parameter(torch.full(shape, cfg.init_log_alpha, device=device, dtype=torch.float32))
        self.l0_weight = cfg.l0_weight
        self.projected = False

    def delta(self) -> torch.Tensor:
        # Once projected the gates are fixed 0/1, so pruned entries stay exactly zero while the kept ones train.
        return self.diff_w * hard_concrete(self.diff_log_alpha, self.training and not self.projected)

    @torch.no_grad()
    def fixed_delta(self) -> torch.Tensor:
        """δ with deterministic gates (what evaluation and merging use)."""
        return self.diff_w * hard_concrete(self.diff_log_alpha, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() + self.delta()
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def peft_aux_loss(self) -> torch.Tensor | None:
        if not self.l0_weight or self.projected:
            return None
        # Expected number of nonzero gates (Louizos et al. Eq. 12).
        return self.l0_weight * torch.sigmoid(self.diff_log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()

    def set_sparse(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Make δ exactly `values` at flat `index` and zero elsewhere (gates fully open / closed)."""
        with torch.no_grad():
            w, gate = torch.zeros_like(self.diff_w).view(-1), torch.full_like(self.diff_w, CLOSED).view(-1)
            w[index], gate[index] = values.to(w), OPEN
            self.diff_w.copy_(w.view_as(self.diff_w))
            self.diff_log_alpha.copy_(gate.view_as(self.diff_log_alpha))
        self.diff_log_alpha.requires_grad_(False)  # the mask is final; only the kept values may still move
        self.projected = True

    def merged(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))  # fp32 sum
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def diff_modules(model: nn.Module) -> dict[str, DiffLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DiffLinear)}


def inject(model: nn.Module, cfg: DiffPruningConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    for name in names:
        replace_module(model, name, DiffLinear(model.get_submodule(name), cfg))
    return model


def merge(model: nn.Module, cfg: DiffPruningConfig) -> nn.Module:
    was_training = model.training
    model.eval()  # the deterministic gates
    for name, module in list(diff_modules(model).items()):
        replace_module(model, name, module.merged())
    return model.train(was_training)


def project(model: nn.Module, density: float) -> dict:
    """Keep the largest-magnitude entries of δ over all layers (global magnitude projection, paper Sec. 3.3)."""
    modules = diff_modules(model)
    with torch.no_grad():
        deltas = {n: (m.diff_w * hard_concrete(m.diff_log_alpha, False)).view(-1) for n, m in modules.items()}
        flat = torch.cat(list(deltas.values()))
        nonzero_before = int((flat != 0).sum())
        keep = max(1, min(int(round(density * flat.numel())), nonzero_before or 1))
        threshold = flat.abs().topk(keep).values[-1]
        kept = 0
        for name, module in modules.items():
            index = ((deltas[name].abs() >= threshold) & (deltas[name] != 0)).nonzero().squeeze(1)
            module.set_sparse(index, deltas[name][index])
            kept += index.numel()
    return {"diff_params": flat.numel(), "nonzero_before_projection": nonzero_before, "nonzero": kept,
            "density": kept / flat.numel(), "target_density": density}


def _density(model: nn.Module) -> float:
    """Nonzero fraction of δ now (kept entries that trained to exactly zero no longer count)."""
    modules = diff_modules(model).values()
    return sum(int((m.fixed_delta() != 0).sum()) for m in modules) / sum(m.diff_w.numel() for m in modules)


def pack_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Projected layers are saved as (indices, values); unprojected ones (checkpoints mid-run) stay dense."""
    for name, module in diff_modules(model).items():
        if module.projected:
            tensors.pop(f"{name}.diff_w")
            tensors.pop(f"{name}.diff_log_alpha", None)
            delta = module.fixed_delta().reshape(-1)
            index = (delta != 0).nonzero().squeeze(1)
            tensors[f"{name}.diff_index"], tensors[f"{name}.diff_values"] = index, delta[index]
    return tensors


def unpack_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, module in diff_modules(model).items():
        if f"{name}.diff_index" in tensors:
            module.set_sparse(tensors.pop(f"{name}.diff_index"), tensors.pop(f"{name}.diff_values"))
            tensors[f"{name}.diff_w"] = module.diff_w.detach().clone()
            tensors[f"{name}.diff_log_alpha"] = module.diff_log_alpha.detach().clone()
    return tensors


class ProjectCallback(MethodCallback):
    """Projects δ to the target density once `finetune` of the steps remain (or at the end), then the kept entries
    keep training under a fixed mask; writes diff_pruning.json."""

    def __init__(self, cfg: DiffPruningConfig, model: nn.Module):
        self.cfg, self.model = cfg, model
        self.report: dict | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.report is None and state.global_step >= round((1 - self.cfg.finetune) * state.max_steps):
            self.report = project(self.model, self.cfg.target_density)

    def on_train_end(self, args, state, control, **kwargs):
        if self.report is None or not all(m.projected for m in diff_modules(self.model).values()):
            self.report = project(self.model, self.cfg.target_density)
        report = dict(self.report, density=_density(self.model))
        logger.info("diff pruning: kept %d of %d diff entries (density %.4f)", report["nonzero"],
                    report["diff_params"], report["density"])
        if state.is_world_process_zero:
            from ..files import atomic_write

            atomic_write(os.path.join(args.output_dir, REPORT_FILE), json.dumps(report, indent=2))


METHOD = Method(
    name="diff_pruning", summary="sparse task diff on frozen weights (L0 hard-concrete gates, magnitude projection)",
    config_cls=DiffPruningConfig, inject=inject, merge=merge, pack_state=pack_state, unpack_state=unpack_state,
    callbacks=lambda cfg, model: [ProjectCallback(cfg, model)],
    paper="Guo et al. 2021, Parameter-Efficient Transfer Learning with Diff Pruning (ACL)")
