"""Child-Tuning: F masks are fresh each step and unbiased; D updates exactly the Fisher-selected child."""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from peftcli.methods.child_tuning import ChildTuningConfig, bernoulli_mask_, masked_parameters, masks

from train_helpers import make_trainer


def test_f_mask_is_unbiased_and_keeps_p():
    grad = torch.linspace(-1, 1, 2000)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([_masked(grad, 0.3, generator) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), grad, atol=0.08, rtol=0)  # E[g * m / p] = g
    kept = (draws != 0).float().mean()
    assert abs(kept.item() - 0.3) < 0.01


def _masked(grad, p, generator):
    out = grad.clone()
    bernoulli_mask_(out, p, generator)
    return out


class MaskRecorder(TrainerCallback):
    """Records which gradient entries of one tensor survive the mask at each step (runs after Child-Tuning's)."""

    def __init__(self):
        self.kept = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        _, p = masked_parameters(model)[5]
        self.kept.append(p.grad != 0)


def test_f_masks_are_fresh_each_step(tiny_bert, tmp_path):
    trainer = make_trainer(tiny_bert, tmp_path, method="child_tuning", cfg=ChildTuningConfig(mode="F"),
                           max_steps=3)
    recorder = MaskRecorder()
    trainer.add_callback(recorder)  # after the method's callback, so it sees the masked gradient
    trainer.train()
    first, second, third = recorder.kept
    assert 0.15 < first.float().mean() < 0.45
    assert not torch.equal(first, second) and not torch.equal(second, third)


def test_d_updates_only_the_selected_child(tiny_bert, tmp_path):
    cfg = ChildTuningConfig(mode="D", reserve_p=0.2, fisher_batches=3)
    trainer = make_trainer(tiny_bert, tmp_path, method="child_tuning", cfg=cfg, max_steps=4, weight_decay=0.0)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in masked_parameters(model)}
    trainer.train()
    pairs = masks(model)
    selected = sum(int(m.sum()) for _, m in pairs)
    total = sum(m.numel() for _, m in pairs)
    assert abs(selected / total - 0.2) < 0.02
    changed_selected = 0
    by_id = {id(p): n for n, p in masked_parameters(model)}
    for p, mask in pairs:
        delta = p.detach() != before[by_id[id(p)]]
        assert not delta[~mask].any(), f"{by_id[id(p)]}: an unselected weight moved"
        changed_selected += int(delta[mask].sum())
    assert changed_selected > 0.5 * selected
