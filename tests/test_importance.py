"""Importance-scored learning rates: scores, mapping, Hessian estimate, and the lr the optimizer really applies."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from peftcli.errors import UserError
from peftcli.training.importance import hutchinson_trace, scales_from_scores
from peftcli.training.importance_callback import ImportanceCallback
from peftcli.config.sections import ImportanceSection, OptimSection
from peftcli.methods.recipes import recipe_from_dict

from train_helpers import make_trainer


class AppliedLrCheck(TrainerCallback):
    """With plain SGD (no momentum, no decay) a step moves p by exactly -lr x grad: records, for every group and
    step, the lr the optimizer actually applied (from the parameter change) and the lr the formula predicts."""

    def __init__(self):
        self.rows = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
        self.before = []
        for i, group in enumerate(optimizer.param_groups):
            # the tensor whose step is largest relative to its values (LayerNorm weights near 1.0 round tiny steps away)
            p = max((p for p in group["params"] if p.grad is not None),
                    key=lambda p: (p.grad.abs() / (p.detach().abs() + 1e-3)).max().item())
            expected = (args.learning_rate * group["lr_multiplier"] * sched.lr_lambdas[i](sched.last_epoch)
                        * group["lr_scale"])
            self.before.append((p, p.detach().clone(), p.grad.detach().clone(), expected, group["lr_scale"]))

    def on_optimizer_step(self, args, state, control, **kwargs):
        for p, old, grad, expected, scale in self.before:
            top = grad.abs().flatten().topk(min(5, grad.numel())).indices  # largest moves: least float32 rounding
            applied = ((old - p.detach()).flatten()[top].double() / grad.flatten()[top].double()).median().item()
            self.rows.append((applied, expected, scale))


def importance(**kw) -> OptimSection:
    base = {"scores": {"taylor": 1.0, "weight_l2": 0.5}, "warmup_steps": 2, "update_every": 2, "temperature": 0.5}
    return OptimSection(layer_decay=0.8, importance=ImportanceSection(**{**base, **kw}))


def test_multipliers_reach_the_optimizer_under_accelerate(tiny_bert, tmp_path):
    from accelerate.optimizer import AcceleratedOptimizer

    check = AppliedLrCheck()
    trainer = make_trainer(tiny_bert, tmp_path, rules=importance(), callbacks=[check], optim="sgd",
                           warmup_steps=3, max_steps=8)
    trainer.train()
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    scaled = [row for row in check.rows if row[2] != 1.0]
    assert scaled, "no importance multiplier was ever applied"
    for applied, expected, _ in check.rows:
        assert applied == pytest.approx(expected, rel=1e-2, abs=1e-9)
    scales = [g["lr_scale"] for g in trainer.optimizer.param_groups]
    assert min(scales) < 1.0 < max(scales)
    lines = (tmp_path / "importance.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6, 8]
    assert (tmp_path / "importance.png").stat().st_size > 0
    assert any("importance/scale_max" in h for h in trainer.state.log_history)


def test_layers_option_leaves_other_groups_at_base_rate(tiny_bert, tmp_path):
    trainer = make_trainer(tiny_bert, tmp_path, rules=importance(layers=[0], granularity="tensor"), max_steps=4)
    trainer.train()
    in_scope = [g["lr_scale"] for g in trainer.optimizer.param_groups
                if g["importance_unit"].startswith("bert.encoder.layer.0.")]
    others = [g["lr_scale"] for g in trainer.optimizer.param_groups
              if not g["importance_unit"].startswith("bert.encoder.layer.0.")]
    assert len(set(in_scope)) > 1 and others and all(scale == 1.0 for scale in others)


def test_hessian_scores_run_in_the_trainer_and_state_round_trips(tiny_bert, tmp_path):
    rules = importance(scores={"hessian": 1.0, "fisher": 1.0}, hessian_interval=2, hessian_probes=2)
    trainer = make_trainer(tiny_bert, tmp_path, rules=rules, max_steps=4)
    trainer.train()
    state = trainer.importance.state_dict()
    assert set(state["tensors"]) == {"ema.hessian", "ema.fisher", "scales"}
    json.dumps(state["json"])
    restored = ImportanceCallback(rules.importance, None)
    restored.load_state_dict(state)
    for key, value in state["tensors"].items():
        torch.testing.assert_close(restored.state_dict()["tensors"][key], value, rtol=0, atol=0)
    assert restored.units == trainer.importance.units


def test_hutchinson_is_exact_on_a_diagonal_hessian():
    x, y = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(3))
    a, b = torch.arange(1.0, 6.0), torch.tensor([10.0, 20.0, 30.0])
    loss_fn = lambda: 0.5 * (a * x * x).sum() + 0.5 * (b * y * y).sum()  # noqa: E731
    trace = hutchinson_trace(loss_fn, [{"params": [x]}, {"params": [y]}], probes=3)
    torch.testing.assert_close(trace, torch.tensor([15.0 / 5, 60.0 / 3]))


@pytest.mark.parametrize("mapping", ["rank", "power"])
def test_mapping_is_monotone_and_clamped(mapping):
    scores = torch.tensor([3.0, 0.1, 50.0, 2.0, 7.0])
    cfg = ImportanceSection(mapping=mapping, temperature=0.3, scale_range=[0.5, 2.0])
    scales = scales_from_scores(scores, cfg)
    order = scores.argsort()
    assert torch.all(scales[order][1:] >= scales[order][:-1])
    assert scales.min() >= 0.5 and scales.max() <= 2.0 and scales.max() > scales.min()
    inverted = scales_from_scores(scores, ImportanceSection(mapping=mapping, temperature=0.3, invert=True))
    assert torch.all(inverted[order][1:] <= inverted[order][:-1])


def test_bad_importance_settings_name_the_key(tiny_bert):
    raw = {"model": {"name_or_path": str(tiny_bert)}, "data": {"train": "x.jsonl"}, "method": {"name": "full"},
           "optim": {"importance": {"scores": {"taylr": 1.0}}}}
    with pytest.raises(UserError, match="optim.importance.scores"):
        recipe_from_dict(raw, "r.yaml", tiny_bert)
    raw["optim"]["importance"] = {"scale_range": [2.0, 0.5]}
    with pytest.raises(UserError, match="scale_range"):
        recipe_from_dict(raw, "r.yaml", tiny_bert)


def test_peft_train_writes_importance_logs_to_the_run(tiny_bert, tmp_path):
    from test_cli import invoke, write_recipe
    from tiny import REVIEWS

    import yaml

    data = {"train": str(REVIEWS / "train.jsonl"), "max_length": 32, "limit": {"train": 48}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "lora"}, data,
                          tmp_path / "run", max_steps=6)
    raw = yaml.safe_load(recipe.read_text())
    raw["optim"] = {"importance": {"warmup_steps": 2, "update_every": 2, "granularity": "module"}}
    recipe.write_text(yaml.safe_dump(raw))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in (tmp_path / "run" / "importance.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [2, 4, 6] and len(entries[0]["scale"]) == len(entries[0]["units"]) > 2
    assert (tmp_path / "run" / "importance.png").is_file()


def test_score_every_k_scores_only_every_kth_step(tiny_bert, tmp_path, monkeypatch):
    """`score_every: k` folds gradient scores into the EMA on steps 0, k, 2k, ... only: the knob that divides the
    scoring cost by k."""
    from peftcli.training import importance_callback

    scored = []
    real = importance_callback.group_scores

    def counting(groups, kinds):
        scored.append(kinds)
        return real(groups, kinds)

    monkeypatch.setattr(importance_callback, "group_scores", counting)
    for every, expected in ((1, 6), (3, 2)):
        scored.clear()
        rules = importance(scores={"taylor": 1.0}, score_every=every)
        make_trainer(tiny_bert, tmp_path / str(every), rules=rules, max_steps=6).train()
        assert len([k for k in scored if "taylor" in k]) == expected
