"""AdaLoRA: the budget schedule, importance-driven masks reaching the target budget, checkpointable scores, merge."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

import test_lifecycle as lc
from peftcli.workflows.merge_export import check_finite
from peftcli.errors import UserError
from peftcli.methods.adalora import AdaLoraConfig, AdaLoraLinear, BudgetCallback, budget, validate
from runhelp import run_cli
from tiny import REVIEWS
from peftcli.files import FORMAT_VERSION, TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import load_tensors_into, save_trained

TASK = "sequence-classification"


def test_budget_schedule_is_initial_then_cubic_then_target():
    cfg = AdaLoraConfig(warmup=0.1, final=0.2)
    values = [budget(step, 100, cfg, 120, 80) for step in range(100)]
    assert values[:10] == [120] * 10
    assert values[80:] == [80] * 20
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert 80 < values[30] < 120


def train_with_callback(model, cfg, steps):
    callback = BudgetCallback(cfg, model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    state = SimpleNamespace(global_step=0, max_steps=steps, is_world_process_zero=True)
    inputs = lc.sample_inputs(TASK)
    for step in range(steps):
        state.global_step = step
        loss = model(**inputs).loss + sum(m.peft_aux_loss() for m in callback.modules.values())
        loss.backward()
        callback.on_pre_optimizer_step(None, state, None)
        optimizer.step()
        callback.on_optimizer_step(None, state, None)
        optimizer.zero_grad()
    return callback


def allocate_at(callback, step, total, lambda_scores):
    """One allocation step with the given λ scores (P and Q scoring zero), as the Trainer calls the hooks."""
    for name, module in callback.modules.items():
        for pname in ("lora_A", "lora_B", "lora_E"):
            shape = getattr(module, pname).shape
            callback.sensitivity[f"{name}.{pname}"] = torch.zeros(shape)
            callback.uncertainty[f"{name}.{pname}"] = torch.ones(shape)
        callback.sensitivity[f"{name}.lora_E"] = torch.tensor(lambda_scores[name])
    state = SimpleNamespace(global_step=step, max_steps=total, is_world_process_zero=True)
    callback.on_pre_optimizer_step(None, state, None)
    callback.on_optimizer_step(None, state, None)


def live(callback):
    return {n: (m.lora_E * m.adalora_mask != 0).tolist() for n, m in callback.modules.items()}


def test_a_pruned_triplet_returns_when_its_importance_rises():
    # Budget 4 -> 2 over 100 steps: steps 20 and 30 allow 3 triplets, the final phase (step >= 80) allows 2.
    cfg = AdaLoraConfig(init_r=2, target_r=1, delta_t=10, warmup=0.1, final=0.2)
    model = torch.nn.ModuleDict({n: AdaLoraLinear(torch.nn.Linear(4, 4), r=2, scale=1.0, dropout=0.0,
                                                  orth_weight=0.0) for n in ("a", "b")})
    callback = BudgetCallback(cfg, model)
    with torch.no_grad():
        for module in callback.modules.values():
            module.lora_E.fill_(1.0)
    allocate_at(callback, 20, 100, {"a": [3.0, 0.1], "b": [2.0, 1.0]})
    assert live(callback) == {"a": [True, False], "b": [True, True]}

    with torch.no_grad():
        callback.modules["a"].lora_E[1] = 0.5  # the pruned λ kept training (Alg. 1) and grew back
    allocate_at(callback, 30, 100, {"a": [3.0, 4.0], "b": [2.0, 0.1]})
    assert live(callback) == {"a": [True, True], "b": [True, False]}

    allocate_at(callback, 80, 100, {"a": [3.0, 4.0], "b": [2.0, 0.1]})
    assert callback.ranks() == {"a": 2, "b": 0}
    allocate_at(callback, 90, 100, {"a": [0.1, 0.2], "b": [3.0, 4.0]})  # the final budget stays fixed
    assert callback.ranks() == {"a": 2, "b": 0}


def test_budget_reaches_target_and_masks_reload(tiny_bert, tmp_path):
    cfg = AdaLoraConfig(init_r=6, target_r=2, delta_t=2, warmup=0.1, final=0.2,
                        target_modules=["query", "key", "value"])
    model = prepare_model(lc.load_base(tiny_bert, TASK), "adalora", cfg).train()
    callback = train_with_callback(model, cfg, steps=30)
    ranks = callback.ranks()
    assert sum(ranks.values()) == cfg.target_r * len(ranks) == callback.target
    for module in callback.modules.values():
        assert set(module.adalora_mask.tolist()) <= {0.0, 1.0}

    save_trained(model, tmp_path, {"method": "adalora", "format_version": FORMAT_VERSION})
    reloaded = prepare_model(lc.load_base(tiny_bert, TASK), "adalora", cfg)
    load_tensors_into(reloaded, tmp_path / TENSORS)
    assert {n: m.rank() for n, m in reloaded.named_modules() if isinstance(m, AdaLoraLinear)} == ranks
    torch.testing.assert_close(lc.outputs(reloaded.eval(), lc.sample_inputs(TASK)),
                               lc.outputs(model.eval(), lc.sample_inputs(TASK)), rtol=0, atol=0)

    fresh = BudgetCallback(cfg, reloaded)
    fresh.load_state_dict(callback.state_dict())
    for key, value in callback.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_orthogonality_regulariser_vanishes_on_orthonormal_factors():
    layer = AdaLoraLinear(torch.nn.Linear(8, 8), r=4, scale=1.0, dropout=0.0, orth_weight=1.0)
    assert layer.peft_aux_loss() > 0
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(8, 8))[0]
        layer.lora_A.copy_(q[:4])
        layer.lora_B.copy_(q[:, :4])
    assert layer.peft_aux_loss() < 1e-8


def test_merge_is_fp32_and_nan_is_an_error():
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = AdaLoraLinear(base, r=4, scale=2.0, dropout=0.0, orth_weight=0.0)
    with torch.no_grad():
        layer.lora_E.fill_(1e-3)  # an update far below bf16 resolution of each term, summed in fp32
        layer.adalora_mask[1] = 0
    expected = (base.weight.float() + 2.0 * (layer.lora_B * (layer.lora_E * layer.adalora_mask)) @ layer.lora_A)
    torch.testing.assert_close(layer.merged().weight, expected.to(torch.bfloat16), rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_E[0] = float("nan")
    model = torch.nn.Sequential(layer.merged())
    with pytest.raises(UserError, match="NaN"):
        check_finite(model)


def test_validate_rejects_a_growing_budget():
    assert "target_r" in validate(AdaLoraConfig(init_r=4, target_r=8))
    assert "warmup + final" in validate(AdaLoraConfig(warmup=0.5, final=0.5))


def test_cli_train_writes_final_ranks(tiny_bert, tmp_path):
    out = tmp_path / "run"
    recipe = {"model": {"name_or_path": str(tiny_bert)},
              "data": {"train": str(REVIEWS / "train.jsonl"), "limit": {"train": 48}, "max_length": 32},
              "method": {"name": "adalora", "init_r": 4, "target_r": 2, "delta_t": 2,
                         "target_modules": ["query", "value"]},
              "train": {"output_dir": str(out), "max_steps": 12, "per_device_train_batch_size": 8,
                        "learning_rate": 1e-2, "use_cpu": True, "seed": 1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_cli("train", str(path))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "adalora_ranks.json").read_text())
    assert report["total_rank"] == report["target_budget"] == 2 * 4  # 2 layers x (query, value)
    assert sum(report["ranks"].values()) == report["total_rank"]
