"""Exact resume: a run SIGKILLed at chosen steps or inside a save, then resumed, equals the uninterrupted run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from peftcli.training import checkpoints as checkpoint
from runhelp import REPO, run_cli, run_subprocess, step_losses, write_recipe


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    """The uninterrupted run (12 optimizer steps, checkpoints every 2)."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "out"
    result = run_cli("train", str(write_recipe(folder, tiny_bert, out)))
    assert result.exit_code == 0, result.output
    return out


def assert_same_run(resumed, reference):
    assert step_losses(resumed) == step_losses(reference)
    assert len(step_losses(reference)) == 12
    got, want = load_file(resumed / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def kill_and_resume(tiny_bert, tmp_path, kill_at: str):
    """The same recipe (same output_dir, so the same recipe hash) killed at `kill_at`, then resumed in-process."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_bert, out)
    killed = run_subprocess("train", str(recipe), env={checkpoint.KILL_ENV: kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = sorted(p.name for p in out.iterdir())
    resumed = run_cli("train", str(recipe), "--resume")
    assert resumed.exit_code == 0, resumed.output
    return out, before


def test_kill_inside_save_then_resume_is_exact(reference, tiny_bert, tmp_path):
    # Killed after step 4's files are staged but before its manifest: checkpoint-4 must not exist, and
    # the resume continues from checkpoint-2 to the reference result.
    out, before = kill_and_resume(tiny_bert, tmp_path, "before_manifest@4")
    assert "checkpoint-2" in before and "checkpoint-4" not in before
    assert ".staging-checkpoint-4" in before
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["step_end@3", "step_end@7", "staged@6", "before_rename@8", "before_rotate@10",
                                     "step_end@6"])
def test_kill_matrix_then_resume_is_exact(reference, tiny_bert, tmp_path, kill_at):
    out, _ = kill_and_resume(tiny_bert, tmp_path, kill_at)
    assert_same_run(out, reference)


def test_resume_skips_a_damaged_newest_checkpoint(reference, tiny_bert, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "adapter.safetensors").unlink()
    damaged = out / "checkpoint-12" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8])  # torn write
    foreign = out / "checkpoint-99"
    foreign.mkdir()  # not ours: no manifest
    assert checkpoint.find_latest(out) == out / "checkpoint-10"
    recipe = write_recipe(tmp_path, tiny_bert, out)
    result = run_cli("train", str(recipe), "--resume")
    assert result.exit_code == 0, result.output
    assert damaged.exists() and foreign.exists(), "invalid checkpoints are skipped, never deleted"
    got, want = load_file(out / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_a_changed_recipe(reference, tiny_bert, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference / "checkpoint-4", out / "checkpoint-4")
    recipe = write_recipe(tmp_path, tiny_bert, out, learning_rate=2e-3)
    result = run_cli("train", str(recipe), "--resume")
    assert result.exit_code == 2
    assert "different recipe" in result.output and "Traceback" not in result.output


def test_sigterm_finishes_the_step_commits_and_exits_3(tiny_bert, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_bert, out, save_strategy="no", max_steps=400)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "peftcli", "train", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "log.jsonl").is_file():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 3, stderr[-2000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "SIGTERM at step" in stopped[0] and "--resume" in stopped[0]
    latest = checkpoint.find_latest(out)
    assert latest is not None and checkpoint.read_manifest(latest)["step"] < 400
    assert not (out / "adapter.safetensors").exists(), "an interrupted run is not a finished run"


def torchrun(recipe, *extra, env=None):
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "peftcli", "train", str(recipe), *extra]
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_process_kill_and_resume_is_exact(tiny_bert, tmp_path):
    """gloo on CPU, 2 ranks: 3 optimizer steps per epoch; killed after step 3, resumed from checkpoint-2."""
    reference, out = tmp_path / "reference", tmp_path / "out"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    done = torchrun(write_recipe(tmp_path / "a", tiny_bert, reference))
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = write_recipe(tmp_path / "b", tiny_bert, out)
    killed = torchrun(recipe, env={checkpoint.KILL_ENV: "step_end@3"})
    assert killed.returncode != 0 and checkpoint.find_latest(out) == out / "checkpoint-2"
    manifest = checkpoint.read_manifest(out / "checkpoint-2")
    assert manifest["world_size"] == 2 and {"rng_state_0.json", "rng_state_1.json"} <= set(manifest["files"])
    one_process = run_cli("train", str(recipe), "--resume")
    assert one_process.exit_code == 2 and "saved by 2 processes, resumed with 1" in one_process.output
    resumed = torchrun(recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(out) == step_losses(reference) and len(step_losses(reference)) == 6
    got, want = load_file(out / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_importance_multipliers_survive_a_kill_and_resume(tiny_bert, tmp_path):
    """The importance callback's EMA scores and multipliers are checkpoint state: a run killed between two
    multiplier updates and resumed must log the same multipliers and losses as the uninterrupted run."""
    import json

    import yaml

    importance = {"scores": {"fisher": 1.0, "grad_norm": 0.5}, "granularity": "layer", "warmup_steps": 2,
                  "update_every": 3, "ema": 0.8, "temperature": 0.5}

    def recipe_in(folder):
        folder.mkdir()
        path = write_recipe(folder, tiny_bert, folder / "out")
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw["optim"] = {"importance": importance}
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path, folder / "out"

    ref_recipe, ref_out = recipe_in(tmp_path / "reference")
    assert run_cli("train", str(ref_recipe)).exit_code == 0
    recipe, out = recipe_in(tmp_path / "killed")
    killed = run_subprocess("train", str(recipe), env={checkpoint.KILL_ENV: "step_end@7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("train", str(recipe), "--resume")
    assert resumed.exit_code == 0, resumed.output

    def multipliers(run):  # the last logged multipliers of every update step (a resumed run re-logs its steps)
        rows = [json.loads(line) for line in (run / "importance.jsonl").read_text(encoding="utf-8").splitlines()]
        return {row["step"]: row for row in rows}

    want, got = multipliers(ref_out), multipliers(out)
    assert len(want) >= 3 and want.keys() == got.keys()
    for step in want:
        assert got[step] == want[step], step
    assert step_losses(out) == step_losses(ref_out)
