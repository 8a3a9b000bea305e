"""Diff pruning: hard-concrete gates, the L0 penalty, projection to the target density, sparse saving, merge."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

import test_lifecycle as lc
from peftcli.methods import get_method
from peftcli.methods.diff_pruning import DiffLinear, DiffPruningConfig, ProjectCallback, hard_concrete
from peftcli.files import FORMAT_VERSION, TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import load_tensors_into, save_trained

TASK = "sequence-classification"


def test_hard_concrete_gates_are_in_unit_interval_and_deterministic_in_eval():
    log_alpha = torch.linspace(-6, 6, 101)
    z = hard_concrete(log_alpha, training=True)
    assert z.min() >= 0 and z.max() <= 1 and (z == 0).any() and (z == 1).any()
    torch.testing.assert_close(hard_concrete(log_alpha, False), hard_concrete(log_alpha, False))


def test_l0_penalty_falls_as_gates_close():
    layer = DiffLinear(torch.nn.Linear(4, 4), DiffPruningConfig(l0_weight=1.0))
    open_penalty = layer.peft_aux_loss()
    with torch.no_grad():
        layer.diff_log_alpha.fill_(-5.0)
    assert layer.peft_aux_loss() < open_penalty / 10
    layer.peft_aux_loss().backward()
    assert layer.diff_log_alpha.grad is not None


def test_projection_reaches_density_saves_sparse_and_reloads(tiny_bert, tmp_path):
    cfg = DiffPruningConfig(target_density=0.02)
    model = prepare_model(lc.load_base(tiny_bert, TASK), "diff_pruning", cfg)
    lc.perturb(model)
    callback = ProjectCallback(cfg, model)
    state = SimpleNamespace(global_step=10, max_steps=10, is_world_process_zero=True)
    callback.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    report = json.loads((tmp_path / "diff_pruning.json").read_text())
    assert abs(report["density"] - 0.02) < 0.001 and report["nonzero"] > 0

    save_trained(model, tmp_path, {"method": "diff_pruning", "format_version": FORMAT_VERSION})
    saved = load_file(str(tmp_path / TENSORS))
    assert not any(k.endswith(("diff_w", "diff_log_alpha")) for k in saved)
    assert sum(v.numel() for k, v in saved.items() if k.endswith("diff_values")) == report["nonzero"]

    model.eval()
    reloaded = prepare_model(lc.load_base(tiny_bert, TASK), "diff_pruning", cfg)
    load_tensors_into(reloaded, tmp_path / TENSORS)
    inputs = lc.sample_inputs(TASK)
    torch.testing.assert_close(lc.outputs(reloaded.eval(), inputs), lc.outputs(model, inputs), rtol=0, atol=0)
    merged = get_method("diff_pruning").merge(reloaded, cfg)
    torch.testing.assert_close(lc.outputs(merged, inputs), lc.outputs(model, inputs), rtol=1e-5, atol=1e-5)


def test_projected_mask_stays_fixed_while_kept_entries_train():
    layer = DiffLinear(torch.nn.Linear(8, 8), DiffPruningConfig())
    layer.set_sparse(torch.tensor([3, 10]), torch.tensor([0.5, -0.25]))
    optimizer = torch.optim.AdamW([layer.diff_w], lr=0.1)
    layer.train()
    for _ in range(3):
        layer(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.fixed_delta().reshape(-1).nonzero().squeeze(1).tolist() == [3, 10]
    assert layer.fixed_delta().reshape(-1)[3] != 0.5  # the kept values moved
