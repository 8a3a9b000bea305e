"""Two-pass consistency: a divergence between two stochastic forward passes of the whole model on one batch."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def consistency_weight(model: nn.Module) -> float:
    """The weight a method asks for by giving its modules a `peft_consistency_weight` (0 or none: off)."""
    return max((float(getattr(m, "peft_consistency_weight", 0.0)) for m in model.modules()), default=0.0)


def second_pass(model: nn.Module, inputs: dict, first_logits: torch.Tensor, causal: bool,
                tokens: float | None = None) -> torch.Tensor:
    """Runs the model again on the batch (its stochastic modules draw afresh) and returns the divergence of the
    two passes' outputs. `tokens`: the normaliser of a token-summed task loss, when the Trainer uses one."""
    second = model(**{k: v for k, v in inputs.items() if k != "labels"})
    labels = inputs.get("labels")
    mask = None
    if first_logits.dim() == 3 and labels is not None:  # token-level: only positions with a target count
        # a causal LM's position i predicts token i + 1, as its loss shifts the labels
        mask = F.pad(labels[..., 1:] != -100, (0, 1), value=False) if causal else labels != -100
    return divergence(first_logits, second.logits, mask, tokens)


def divergence(logits1: torch.Tensor, logits2: torch.Tensor, mask: torch.Tensor | None = None,
               tokens: float | None = None) -> torch.Tensor:
    """½ (KL(p1 || p2) + KL(p2 || p1)) of the softmax outputs, averaged over examples (or the `mask`ed
    positions), as AdaMix's consistency regulariser (Wang et al. 2022, Sec. 3.2). As in the authors' code, each
    KL's target side is detached, so each pass is pulled toward the other. A single output (regression head)
    has no distribution: the squared difference of the two outputs instead."""
    a, b = logits1.float(), logits2.float()
    if a.shape[-1] == 1:
        per_position = (a - b).squeeze(-1) ** 2
    else:
        la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
        kl_ab = (la.detach().exp() * (la.detach() - lb)).sum(-1)  # KL(p1 || p2), gradient into pass 2
        kl_ba = (lb.detach().exp() * (lb.detach() - la)).sum(-1)  # KL(p2 || p1), gradient into pass 1
        per_position = 0.5 * (kl_ab + kl_ba)
    if mask is not None:
        per_position = per_position[mask]
    if tokens is not None:
        return per_position.sum() / tokens
    return per_position.mean() if per_position.numel() else per_position.sum()
