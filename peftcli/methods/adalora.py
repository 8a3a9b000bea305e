"""AdaLoRA (Zhang et al. 2023): SVD-form updates P·Λ·Q whose rank budget is reallocated by importance."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field, fraction, open_fraction, positive
from .lora import DEFAULT_TARGETS, LoraLinear
from .registry import Method, MethodCallback, match_targets, target_error
from ..models.modules import replace_module

logger = logging.getLogger("peftcli")
RANKS_FILE = "adalora_ranks.json"


@dataclasses.dataclass
class AdaLoraConfig:
    init_r: int = field(12, check=positive, doc="starting rank of every adapted layer")
    target_r: int = field(8, check=positive, doc="average final rank per layer (total budget = target_r x layers)")
    alpha: float = field(16.0, check=positive, doc="scale numerator: update = (alpha / init_r) · P·Λ·Q")
    dropout: float = field(0.0, check=open_fraction, doc="dropout on the adapter's input")
    target_modules: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS),
                                            doc="name suffixes, a regex, or all-linear")
    warmup: float = field(0.1, check=fraction, doc="fraction of steps at the initial budget (t_i, Sec. 3.3)")
    final: float = field(0.2, check=fraction, doc="fraction of last steps at the target budget (t_f, Sec. 3.3)")
    delta_t: int = field(10, check=positive, doc="steps between budget reallocations (ΔT, Sec. 3.3)")
    beta1: float = field(0.85, check=open_fraction, doc="EMA of sensitivity (Eq. 9; 0.85 in the paper's GLUE runs)")
    beta2: float = field(0.85, check=open_fraction, doc="EMA of uncertainty (Eq. 10)")
    orth_reg_weight: float = field(0.1, check=lambda v: None if v >= 0 else f"must be >= 0, got {v}",
                                   doc="γ of the orthogonality regulariser ||PᵀP-I||² + ||QQᵀ-I||² (Eq. 4)")


def validate(cfg: AdaLoraConfig) -> str | None:
    if cfg.target_r > cfg.init_r:
        return f"target_r ({cfg.target_r}) must be <= init_r ({cfg.init_r}): the budget only shrinks"
    if cfg.warmup + cfg.final >= 1:
        return f"warmup + final ({cfg.warmup} + {cfg.final}) must be < 1 to leave steps for pruning"
    return None


class AdaLoraLinear(LoraLinear):
    """LoraLinear whose update is P·diag(Λ ⊙ mask)·Q: lora_B is P, lora_E is Λ, lora_A is Q. The mask holds the
    final budget: all ones while budgets are reallocated (pruning zeroes λ_i and the triplet keeps training, so it
    can return), fixed once the target budget is reached. It is a buffer, saved with the run."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float, orth_weight: float):
        super().__init__(base, r, scale, dropout)
        # Λ starts at zero so the update starts at zero; P and Q random (Sec. 3.1).
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, device=self.lora_A.device, dtype=torch.float32))
        self.register_buffer("adalora_mask", torch.ones(r, device=self.lora_A.device, dtype=torch.float32))
        self.orth_weight = orth_weight

    def effective_b(self) -> torch.Tensor:
        return self.lora_B * (self.lora_E * self.adalora_mask)[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..models.kernels import lora_linear

        return lora_linear(x, self.weight, self.bias, self.lora_A, self.effective_b(), self.scale, self.dropout_p,
                           self.training)

    def delta_weight(self) -> torch.Tensor:
        return (self.effective_b().float() @ self.lora_A.float()) * self.scale

    def peft_aux_loss(self) -> torch.Tensor | None:
        if not self.orth_weight:
            return None
        eye = torch.eye(self.lora_A.shape[0], device=self.lora_A.device)
        q, p = self.lora_A, self.lora_B
        return self.orth_weight * ((q @ q.T - eye).pow(2).sum() + (p.T @ p - eye).pow(2).sum())

    def rank(self) -> int:
        return int(self.adalora_mask.sum().item())


def adalora_modules(model: nn.Module) -> dict[str, AdaLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLinear)}


def inject(model: nn.Module, cfg: AdaLoraConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    # The regulariser is averaged over layers so γ does not grow with model depth.
    orth = cfg.orth_reg_weight / len(names)
    for name in names:
        replace_module(model, name, AdaLoraLinear(model.get_submodule(name), cfg.init_r, cfg.alpha / cfg.init_r,
                                                  cfg.dropout, orth))
    return model


def merge(model: nn.Module, cfg: AdaLoraConfig) -> nn.Module:
    for name, module in list(adalora_modules(model).items()):
        replace_module(model, name, module.merged())
    return model


def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.adalora_mask": m.adalora_mask for n, m in adalora_modules(model).items()}


def budget(step: int, total: int, cfg: AdaLoraConfig, initial: int, target: int) -> int:
    """Total rank allowed at `step`: initial during warm-up, cubic decrease, target in the final phase (Eq. 12)."""
    t_init, t_final = int(cfg.warmup * total), int(cfg.final * total)
    span = total - t_init - t_final
    if step < t_init or span <= 0:
        return initial if step < t_init else target
    if step >= total - t_final:
        return target
    progress = 1 - (step - t_init) / span
    return target + int(round((initial - target) * progress ** 3))


class BudgetCallback(MethodCallback):
    """Updates importance scores from gradients after each optimizer step and reallocates the rank budget every
    delta_t steps (Algorithm 1). Its EMA scores are checkpoint state: state_dict()/load_state_dict()."""

    def __init__(self, cfg: AdaLoraConfig, model: nn.Module):
        self.cfg, self.model = cfg, model
        self.modules = adalora_modules(model)
        self.initial = cfg.init_r * len(self.modules)
        self.target = cfg.target_r * len(self.modules)
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def update_importance(self) -> None:
        """Smoothed sensitivity Ī and uncertainty Ū of every parameter entry (Eqs. 8-10)."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, module in self.modules.items():
            for pname in ("lora_A", "lora_B", "lora_E"):
                p = getattr(module, pname)
                if p.grad is None:
                    continue
                key = f"{name}.{pname}"
                score = (p * p.grad).abs().detach().float()
                if key not in self.sensitivity:
                    self.sensitivity[key] = torch.zeros_like(score)
                    self.uncertainty[key] = torch.zeros_like(score)
                self.sensitivity[key].mul_(b1).add_(score, alpha=1 - b1)
                self.uncertainty[key].mul_(b2).add_((score - self.sensitivity[key]).abs(), alpha=1 - b2)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) with s = Ī·Ū (Eq. 7)."""
        scores = {}
        for name, module in self.modules.items():
            s = {p: self.sensitivity.get(f"{name}.{p}") for p in ("lora_A", "lora_B", "lora_E")}
            if any(v is None for v in s.values()):
                continue
            s = {p: v * self.uncertainty[f"{name}.{p}"] for p, v in s.items()}
            scores[name] = s["lora_E"] + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return scores

    def reallocate(self, allowed: int, final: bool) -> None:
        """Keep the `allowed` highest-scoring triplets over all layers and zero λ of the rest (Eq. 11). Every
        triplet competes, pruned ones included: a pruned λ_i keeps its gradient and its scores keep updating, so
        it returns when its importance rises (Sec. 3.2). The final allocation also fixes the masks."""
        scores = self.triplet_scores()
        if len(scores) != len(self.modules):
            return  # no gradients seen yet for some layer
        flat = torch.cat([scores[n] for n in self.modules])
        keep = torch.zeros_like(flat)
        keep[torch.topk(flat, min(allowed, flat.numel())).indices] = 1.0
        offset = 0
        for module in self.modules.values():
            r = module.adalora_mask.numel()
            kept = keep[offset:offset + r].to(module.adalora_mask.device)
            module.lora_E.mul_(kept.to(module.lora_E.dtype))
            if final:
                module.adalora_mask.copy_(kept)
            offset += r

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After the step, like peft's update_and_allocate, so a pruned λ is exactly zero in the next forward pass.
        if sum(m.rank() for m in self.modules.values()) <= self.target:
            return  # the masks are fixed: the final phase fine-tunes at the target budget (t_f, Sec. 3.3)
        with torch.no_grad():
            self.update_importance()
            step, total = state.global_step, state.max_steps
            final = step >= total - int(self.cfg.final * total) or step + 1 >= total
            allowed = budget(step, total, self.cfg, self.initial, self.target)
            if final or (allowed < self.initial and step % self.cfg.delta_t == 0):
                self.reallocate(self.target if final else allowed, final)

    def on_train_end(self, args, state, control, **kwargs):
        ranks = self.ranks()
        logger.info("adalora final ranks (total %d, budget %d): %s", sum(ranks.values()), self.target, ranks)
        if state.is_world_process_zero:
            from ..files import atomic_write

            atomic_write(os.path.join(args.output_dir, RANKS_FILE), json.dumps(
                {"total_rank": sum(ranks.values()), "target_budget": self.target, "ranks": ranks}, indent=2))

    def ranks(self) -> dict[str, int]:
        return {n: m.rank() for n, m in self.modules.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"sensitivity.{k}": v for k, v in self.sensitivity.items()}
        out.update({f"uncertainty.{k}": v for k, v in self.uncertainty.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            kind, _, name = key.partition(".")
            getattr(self, kind)[name] = value.clone()


METHOD = Method(
    name="adalora", summary="SVD-form low-rank updates with an importance-driven rank budget",
    config_cls=AdaLoraConfig, inject=inject, merge=merge, validate=validate, extra_state=extra_state,
    callbacks=lambda cfg, model: [BudgetCallback(cfg, model)],
    paper="Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (ICLR)")
