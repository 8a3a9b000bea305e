"""Child-Tuning (Xu et al. 2021): update only a child network, by random (F) or Fisher-selected (D) gradient masks."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field
from ..models.heads import in_head, trained_head
from .registry import Method, MethodCallback

MASK_PREFIX = "child_mask_"


def _reserve(value: float) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


@dataclasses.dataclass
class ChildTuningConfig:
    mode: Literal["F", "D"] = field("F", doc="F: fresh Bernoulli(p) mask each step; D: Fisher-selected fixed child")
    # p_F in {0.1..0.3} and p_D in {0.1..0.3} work best in the paper's GLUE sweeps (Xu et al. 2021, Sec. 5.1).
    reserve_p: float = field(0.3, check=_reserve, doc="fraction of the gradient kept (F) / of weights updated (D)")
    fisher_batches: int = field(32, check=lambda v: None if v > 0 else "must be > 0",
                                doc="D: training batches used to estimate the Fisher information before training")


def masked_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The pre-trained parameters Child-Tuning masks; the new task head always trains fully."""
    head = trained_head(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and not in_head(n, head)]


def inject(model: nn.Module, cfg: ChildTuningConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.mode == "D":
        # The child network is saved with the run (extra_state) so a resumed run keeps the same child.
        for name, p in masked_parameters(model):
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module.register_buffer(MASK_PREFIX + leaf, torch.ones_like(p, dtype=torch.bool))
    return model


def masks(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, its D mask) pairs, found through the module that owns both."""
    out = []
    for module in model.modules():
        for buffer_name, mask in module.named_buffers(recurse=False):
            if buffer_name.startswith(MASK_PREFIX):
                out.append((getattr(module, buffer_name[len(MASK_PREFIX):]), mask))
    return out


def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.rpartition(".")[2].startswith(MASK_PREFIX)}


def merge(model: nn.Module, cfg: ChildTuningConfig) -> nn.Module:
    for module in model.modules():
        for name in [n for n in module._buffers if n.startswith(MASK_PREFIX)]:
            del module._buffers[name]
    return model


def bernoulli_mask_(grad: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ChildTuning-F (Sec. 3.2): keep each gradient entry with probability p and rescale it by 1/p, an unbiased
    estimate of the full gradient. In place; returns the mask."""
    keep = torch.rand(grad.shape, generator=generator, device=grad.device) < p
    grad.mul_(keep.to(grad.dtype)).div_(p)
    return keep


def select_child(model: nn.Module, batches, reserve_p: float) -> None:
    """ChildTuning-D (Sec. 3.3): accumulate the empirical Fisher diagonal (squared gradients) over training
    batches, then keep the top reserve_p fraction of all masked weights, by one global threshold."""
    pairs = masks(model)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p, _ in pairs]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for total, (p, _) in zip(fisher, pairs):
            if p.grad is not None:
                total += p.grad.detach().float().pow(2)
    model.zero_grad(set_to_none=True)
    flat = torch.cat([f.flatten() for f in fisher])
    keep = max(1, int(round(reserve_p * flat.numel())))
    threshold = flat.kthvalue(flat.numel() - keep + 1).values
    for total, (_, mask) in zip(fisher, pairs):
        mask.copy_(total >= threshold)


class ChildTuningCallback(MethodCallback):
    """Masks gradients right before every optimizer step (after clipping, Sec. 3.1's masked update)."""

    def __init__(self, cfg: ChildTuningConfig):
        self.cfg = cfg

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.cfg.mode != "D":
            return
        if args.weight_decay:
            raise UserError("method child_tuning mode D updates only the child network, but weight decay would "
                            "shrink every weight: set train.weight_decay: 0")
        pairs = masks(model)
        if self.cfg.reserve_p < 1 and all(bool(m.all()) for _, m in pairs):  # not selected yet (or resumed)
            batches = (b for i, b in zip(range(self.cfg.fisher_batches), train_dataloader))
            select_child(model, batches, self.cfg.reserve_p)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.cfg.mode == "D":
            for p, mask in masks(model):
                if p.grad is not None:
                    p.grad.mul_(mask.to(p.grad.dtype))
            return
        for _, p in masked_parameters(model):
            if p.grad is not None:
                bernoulli_mask_(p.grad, self.cfg.reserve_p)


METHOD = Method(
    name="child_tuning", summary="update a child network: random gradient masks (F) or Fisher-selected weights (D)",
    config_cls=ChildTuningConfig, inject=inject, merge=merge, extra_state=extra_state,
    callbacks=lambda cfg, model: [ChildTuningCallback(cfg)],
    paper="Xu et al. 2021, Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning")
