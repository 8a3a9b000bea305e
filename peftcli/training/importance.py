"""Importance-scored learning rates: per-group scores (weights, gradients, Taylor, Fisher, Hessian) -> lr_scale."""
from __future__ import annotations


import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import UserError
from ..methods.registry import layer_index

GRADIENT_SCORES = ("grad_norm", "taylor", "fisher")
WEIGHT_SCORES = ("weight_l1", "weight_l2")
SCORES = WEIGHT_SCORES + GRADIENT_SCORES + ("hessian",)


def importance_unit(name: str, granularity: str) -> str:
    """The unit a parameter is scored in: itself, its module, or its transformer layer."""
    if granularity == "tensor":
        return name
    if granularity == "module":
        return name.rpartition(".")[0] or name
    index = layer_index(name)
    return f"layer.{index}" if index is not None else ("embeddings" if "embed" in name else "other")


def unit_layer(unit: str) -> int | None:
    """Layer index of a unit name (`layer.3` or any parameter/module name inside layer 3)."""
    return int(unit.split(".")[1]) if unit.startswith("layer.") else layer_index(unit)


@torch.no_grad()
def group_scores(groups: list[dict], kinds) -> dict[str, torch.Tensor]:
    """Per-element means per group, so groups of different sizes compare: weight_l1 mean|w|, weight_l2 rms(w),
    grad_norm rms(g), taylor mean|w*g| (first-order Taylor sensitivity, Molchanov et al. 2017, Sec. 2.2),
    fisher mean g^2 (empirical Fisher diagonal). Fused multi-tensor norms, one host transfer per call."""
    pairs = [(i, p) for i, g in enumerate(groups) for p in g["params"]]
    if not pairs:
        return {k: torch.zeros(len(groups)) for k in kinds}
    owner = torch.tensor([i for i, _ in pairs])
    counts = torch.zeros(len(groups)).index_add_(0, owner, torch.tensor([float(p.numel()) for _, p in pairs]))
    weights = [p.detach() for _, p in pairs]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in pairs]
    per_tensor = {}
    for kind in kinds:
        if kind in ("weight_l1", "weight_l2"):
            norms = torch._foreach_norm(weights, 1 if kind == "weight_l1" else 2)
        elif kind in ("grad_norm", "fisher"):
            norms = torch._foreach_norm(grads, 2)
        else:  # taylor: sum |w * g| = L1 norm of the product
            norms = torch._foreach_norm(torch._foreach_mul(weights, grads), 1)
        stacked = torch.stack([n.float() for n in norms])
        per_tensor[kind] = stacked.pow(2) if kind in ("weight_l2", "grad_norm", "fisher") else stacked
    host = torch.stack(list(per_tensor.values())).cpu()  # one device -> host copy
    out = {}
    for row, kind in zip(host, per_tensor):
        sums = torch.zeros(len(groups)).index_add_(0, owner, row) / counts.clamp_min(1)
        out[kind] = sums.sqrt() if kind in ("weight_l2", "grad_norm") else sums
    return out


def hutchinson_trace(loss_fn, groups: list[dict], probes: int) -> torch.Tensor:
    """Per-group Hessian trace / numel by Hutchinson's estimator E[v^T H v], v Rademacher (Hutchinson 1990;
    as used by HAWQ-V2, Dong et al. 2020, Sec. 3.1). Double backward on one batch; leaves .grad untouched."""
    params = [p for g in groups for p in g["params"]]
    sizes = [len(g["params"]) for g in groups]
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads)]
    live = [(i, g) for i, (_, g) in enumerate(pairs) if g is not None and g.requires_grad]
    totals = torch.zeros(len(params))
    for _ in range(probes):
        vs = [torch.randint_like(g, 2) * 2 - 1 for _, g in live]
        hvs = torch.autograd.grad([g for _, g in live], [params[i] for i, _ in live], vs, retain_graph=True,
                                  allow_unused=True)
        for (i, _), v, hv in zip(live, vs, hvs):
            if hv is not None:
                totals[i] += (v * hv).sum().detach().float().cpu() / probes
    out, start = [], 0
    for group, size in zip(groups, sizes):
        out.append(totals[start:start + size].sum() / sum(p.numel() for p in group["params"]))
        start += size
    return torch.stack(out)


def combine(ema: dict[str, torch.Tensor], weights: dict[str, float], scope: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the scores, each divided by its mean over the groups in scope so that kinds with
    different units (norms, squared gradients, curvature) mix by their weights alone."""
    total = torch.zeros_like(scope, dtype=torch.float32)
    for kind, weight in weights.items():
        values = ema[kind].abs()  # Hutchinson estimates can be negative on non-convex losses
        mean = values[scope].mean().clamp_min(1e-30)
        total += weight * values / mean
    return total


def scales_from_scores(scores: torch.Tensor, cfg) -> torch.Tensor:
    """Monotone score -> LR multiplier. rank: exp((u - 1/2) / T) with u the normalised rank in [0, 1];
    power: (score / geometric mean)^(1 / T). Both are clamped to scale_range; invert flips the order."""
    low, high = cfg.scale_range
    n = scores.numel()
    if cfg.mapping == "rank":
        order = scores.argsort(stable=True)
        ranks = torch.empty(n)
        ranks[order] = torch.arange(n, dtype=torch.float32)
        u = ranks / (n - 1) if n > 1 else torch.full((n,), 0.5)
        exponent = (u - 0.5) / cfg.temperature
    else:
        logs = scores.clamp_min(1e-30).log()
        exponent = (logs - logs.mean()) / cfg.temperature
    if cfg.invert:
        exponent = -exponent
    return exponent.exp().clamp(low, high)


class ScaledLambdaLR(LambdaLR):
    """LambdaLR whose lr is base_lr x lambda(step) x the group's `lr_scale`, read from the optimizer's groups
    at every step, so importance scaling composes with any HF schedule and survives optimizer wrapping."""

    def get_lr(self):
        groups = self.optimizer.param_groups
        return [base * fn(self.last_epoch) * group.get("lr_scale", 1.0)
                for base, fn, group in zip(self.base_lrs, self.lr_lambdas, groups)]


def scaled_scheduler(scheduler) -> ScaledLambdaLR:
    if not isinstance(scheduler, LambdaLR):
        raise UserError(f"optim.importance needs a step-wise schedule (linear, cosine, constant...); "
                        f"train.lr_scheduler_type gives {type(scheduler).__name__}: choose another type")
    return ScaledLambdaLR(scheduler.optimizer, list(scheduler.lr_lambdas), last_epoch=-1)
