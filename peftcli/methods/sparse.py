"""Sparse fine-tuning: prune base linear weights (magnitude or Taylor score, optional N:M), train, keep zeros zero."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field, open_fraction
from .registry import Method, MethodCallback, match_targets, target_error

MASK = "sparse_mask"


@dataclasses.dataclass
class SparseConfig:
    sparsity: float = field(0.5, check=open_fraction, doc="fraction of each target weight set to zero")
    n_m: list[int] | None = field(None, doc="[N, M]: keep N of every M consecutive input weights (e.g. [2, 4]); "
                                            "overrides sparsity")
    score: Literal["magnitude", "taylor"] = field("magnitude", doc="magnitude |w| at load, or Taylor |w*g| "
                                                                   "on training batches before training")
    calibration_batches: int = field(8, check=lambda v: None if v > 0 else "must be > 0",
                                     doc="taylor: training batches that score the weights")
    target_modules: list[str] | str = field("all-linear", doc="name suffixes, a regex, or all-linear")


def validate(cfg: SparseConfig) -> str | None:
    if cfg.n_m is not None and not (len(cfg.n_m) == 2 and 0 < cfg.n_m[0] < cfg.n_m[1]):
        return f"n_m must be [N, M] with 0 < N < M, e.g. [2, 4]; got {cfg.n_m}"
    return None


def prune_mask(score: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """True = kept. Unstructured: the top (1 - sparsity) scores of the tensor; N:M: the top N of each run of M
    consecutive weights along the input dimension (the 2:4 pattern sparse tensor cores run, Mishra et al. 2021)."""
    if cfg.n_m is not None:
        n, m = cfg.n_m
        groups = score.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        return keep.reshape(score.shape)
    kept = score.numel() - int(round(cfg.sparsity * score.numel()))
    keep = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    keep[score.flatten().topk(kept).indices] = True
    return keep.reshape(score.shape)


def inject(model: nn.Module, cfg: SparseConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    for name in names:
        layer = model.get_submodule(name)
        if cfg.n_m is not None and layer.in_features % cfg.n_m[1]:
            raise UserError(f"method.n_m: {name} has {layer.in_features} inputs, not a multiple of M={cfg.n_m[1]}")
        layer.weight.requires_grad_(True)
        # Taylor scores need gradients: that mask is chosen at the start of training (SparseCallback).
        mask = prune_mask(layer.weight.detach().abs().float(), cfg) if cfg.score == "magnitude" else \
            torch.ones_like(layer.weight, dtype=torch.bool)
        layer.register_buffer(MASK, mask)
        with torch.no_grad():
            layer.weight.mul_(mask.to(layer.weight.dtype))
    return model


def masked_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if MASK in getattr(m, "_buffers", {})]


def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.rpartition(".")[2] == MASK}


def merge(model: nn.Module, cfg: SparseConfig) -> nn.Module:
    """The weights are already sparse: drop the masks, leaving plain nn.Linear layers with exact zeros."""
    for layer in masked_layers(model):
        del layer._buffers[MASK]
    return model


def achieved_sparsity(model: nn.Module) -> float:
    layers = masked_layers(model)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    return zeros / max(1, sum(layer.weight.numel() for layer in layers))


class SparseCallback(MethodCallback):
    """Chooses Taylor masks before training, masks gradients, re-applies the masks after every optimizer step
    (so no optimizer state can revive a pruned weight), and reports the achieved sparsity."""

    def __init__(self, cfg: SparseConfig):
        self.cfg = cfg

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        layers = masked_layers(model)
        if self.cfg.score == "taylor" and all(bool(layer.sparse_mask.all()) for layer in layers):
            scores = [torch.zeros_like(layer.weight, dtype=torch.float32) for layer in layers]
            for _, batch in zip(range(self.cfg.calibration_batches), train_dataloader):
                model.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
                for total, layer in zip(scores, layers):
                    total += (layer.weight.detach() * layer.weight.grad).abs().float()
            model.zero_grad(set_to_none=True)
            for total, layer in zip(scores, layers):
                layer.sparse_mask.copy_(prune_mask(total, self.cfg))
        self._apply(layers)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for layer in masked_layers(model):
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(layer.sparse_mask.to(layer.weight.grad.dtype))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._apply(masked_layers(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        sparsity = achieved_sparsity(model)
        state.log_history.append({"step": state.global_step, "achieved_sparsity": sparsity})
        if state.is_world_process_zero:
            from ..files import atomic_write

            os.makedirs(args.output_dir, exist_ok=True)
            atomic_write(os.path.join(args.output_dir, "sparsity.json"),
                         json.dumps({"achieved_sparsity": sparsity, "target": self._target()}, indent=2))

    def _target(self) -> float:
        return 1 - self.cfg.n_m[0] / self.cfg.n_m[1] if self.cfg.n_m else self.cfg.sparsity

    @staticmethod
    @torch.no_grad()
    def _apply(layers) -> None:
        for layer in layers:
            layer.weight.mul_(layer.sparse_mask.to(layer.weight.dtype))


METHOD = Method(
    name="sparse", summary="prune base linear weights to a target sparsity (or N:M) and fine-tune the rest",
    config_cls=SparseConfig, inject=inject, merge=merge, extra_state=extra_state, validate=validate,
    callbacks=lambda cfg, model: [SparseCallback(cfg)],
    paper="Han et al. 2015 (magnitude pruning); Molchanov et al. 2017 (Taylor scores); Mishra et al. 2021 (2:4)")
