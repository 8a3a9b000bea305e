"""Checkpoint mechanics without training: state round trips, commit/verify, rotation, choosing where to resume."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from peftcli.training import checkpoints as checkpoint
from peftcli.errors import UserError
from peftcli.training.state_io import load_state, rng_state, save_state, set_rng_state


def test_optimizer_and_scheduler_state_round_trip_bitwise(tmp_path):
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([param], lr=1e-2, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        param.grad = torch.randn(4, 3)
        optimizer.step()
        scheduler.step()
    save_state(optimizer.state_dict(), tmp_path / "optimizer")
    save_state(scheduler.state_dict(), tmp_path / "scheduler")
    twin = torch.nn.Parameter(param.detach().clone())
    optimizer2 = torch.optim.AdamW([twin], lr=1.0)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda step: 1 / (step + 1))
    optimizer2.load_state_dict(load_state(tmp_path / "optimizer"))
    scheduler2.load_state_dict(load_state(tmp_path / "scheduler"))
    assert optimizer2.param_groups[0]["betas"] == (0.8, 0.99)
    grad = torch.randn(4, 3)
    for p, opt, sch in ((param, optimizer, scheduler), (twin, optimizer2, scheduler2)):
        p.grad = grad.clone()
        opt.step()
        sch.step()
    assert torch.equal(param, twin) and scheduler.get_last_lr() == scheduler2.get_last_lr()


def test_rng_state_round_trip(tmp_path):
    save_state(rng_state(), tmp_path / "rng")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(load_state(tmp_path / "rng"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def make_checkpoint(run_dir, step, world_size=1, recipe="r"):
    staging = checkpoint.begin(run_dir, step)
    (staging / "adapter.safetensors").write_bytes(b"x" * (step + 10))
    return checkpoint.commit(staging, step, world_size, recipe)


def test_commit_verify_and_damage(tmp_path):
    path = make_checkpoint(tmp_path, 4)
    assert path == tmp_path / "checkpoint-4" and checkpoint.verify(path) is None
    assert not checkpoint.staging_path(tmp_path, 4).exists()
    (path / "adapter.safetensors").write_bytes(b"y" * 14)  # same size, other bytes
    assert "sha256" in checkpoint.verify(path)
    (path / "adapter.safetensors").write_bytes(b"y")
    assert "bytes" in checkpoint.verify(path)
    (path / "adapter.safetensors").unlink()
    assert "missing" in checkpoint.verify(path)


def test_find_latest_skips_invalid_without_deleting(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoint-4" / checkpoint.MANIFEST).unlink()  # as if killed before the manifest
    (tmp_path / "checkpoint-9").mkdir()  # someone else's folder
    checkpoint.begin(tmp_path, 6)  # a crashed save's staging folder
    assert checkpoint.find_latest(tmp_path) == tmp_path / "checkpoint-2"
    assert "skipping" in caplog.text and "checkpoint-9" in caplog.text
    assert (tmp_path / "checkpoint-4").exists() and (tmp_path / "checkpoint-9").exists()


def test_rotation_deletes_only_our_old_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-1").mkdir()  # foreign: never counted nor deleted
    removed = checkpoint.rotate(tmp_path, 2, keep={tmp_path / "checkpoint-8"})
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-6", "checkpoint-8"]


def test_committing_over_an_invalid_folder_sets_it_aside(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "notes.txt").write_text("mine")
    make_checkpoint(tmp_path, 4)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-4.replaced-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"


def test_resume_point_refuses_other_world_size_recipe_and_foreign_dirs(tmp_path, monkeypatch):
    make_checkpoint(tmp_path, 2, world_size=2, recipe="abc")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="saved by 2 processes, resumed with 1"):
        checkpoint.resume_point(tmp_path, True, "abc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="different recipe"):
        checkpoint.resume_point(tmp_path, True, "other")
    assert checkpoint.resume_point(tmp_path, True, "abc") == tmp_path / "checkpoint-2"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="not a peftcli run"):
        checkpoint.resume_point(foreign, True, "abc")
    with pytest.raises(UserError, match="not a valid checkpoint"):
        checkpoint.resume_point(tmp_path, str(foreign), "abc")
