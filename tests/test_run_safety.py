"""Run-folder safety through the CLI: one writer per folder (the run lock), resume of a finished run changes
nothing, --overwrite deletes only what peftcli wrote, eval outputs never land on the run's files or its inputs,
and `evaluate:` metric scripts run only when the recipe trusts them."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftcli.run_lock import lock_path
from peftcli.training import checkpoints as checkpoint
from peftcli.training.crash_safety import StopOnSignal
from runhelp import REPO, run_cli, step_losses, write_recipe
from tiny import REVIEWS

# Takes the lock of a folder, says "held", keeps it until its stdin closes: another writer, cheap to start.
HOLDER = """
import sys
from peftcli.run_lock import acquire
lock = acquire(sys.argv[1], sys.argv[2])
print("held", flush=True)
sys.stdin.read()
lock.release()
"""
FINAL_FILES = ("adapter.safetensors", "method.json", "trainer_state.json", "metrics.json", "run_info.json",
               "README.md", "loss.png", "per_class.json", "confusion_matrix.png")


@pytest.fixture(autouse=True)
def single_process_job(monkeypatch):
    """No launcher variables: this process and its children are rank 0 and take the lock."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture(scope="module")
def inputs(tiny_bert, tmp_path_factory) -> Path:
    """A copy of the base model and data, so a test that a write is refused can never damage the shared ones."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copytree(tiny_bert, folder / "model")
    (folder / "data").mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        shutil.copy(REVIEWS / name, folder / "data" / name)
    return folder


def recipe_in(folder: Path, inputs: Path, out: Path, **train) -> Path:
    """runhelp's tiny LoRA recipe on the copied inputs, with eval data: 5 steps, the last one checkpointed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_recipe(folder, inputs / "model", out, **{"max_steps": 5, "save_steps": 5, **train})
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    data = inputs / "data"
    raw["data"].update({"train": str(data / "train.jsonl"), "eval": str(data / "validation.jsonl"),
                        "limit": {"train": 48, "eval": 16}})
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run): a finished run whose last checkpoint, checkpoint-5, is at its final step. Copy before use."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = recipe_in(folder, inputs, folder / "run")
    result = run_cli("train", str(recipe))
    assert result.exit_code == 0, result.output
    return recipe, folder / "run"


def copy_run(finished, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[1], run)
    return run


def digests(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders: what must not change."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, *wanted: str) -> str:
    """Exit 2 with one `error:` line (no traceback) that holds every wanted text; returns the line."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for text in wanted:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def start_holder(folder: Path, command: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), command], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == "held\n", "the holder process failed to take the lock"
    return proc


def stop_holder(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=10)


# --- the lock ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_second_train_is_refused_while_a_training_process_holds_the_run(tiny_bert, tmp_path):
    """Two real `peft train` processes on one folder: the second (new, --resume or --overwrite) exits 2 naming the
    first, and the first run's files stay as they were. Slow tier: a `peft train` subprocess starts in seconds."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_bert, out, max_steps=100_000, save_steps=20)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "peftcli", "train", str(recipe)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # stdout: a log line per step
    try:
        deadline = time.time() + 120
        while time.time() < deadline and checkpoint.find_latest(out) is None and proc.poll() is None:
            time.sleep(0.1)
        first = checkpoint.find_latest(out)
        assert first is not None, "the first run saved no checkpoint"
        before = (out / "recipe.yaml").read_bytes(), digests(first)
        for extra in ((), ("--resume",), ("--overwrite",)):
            line = refused(run_cli("train", str(recipe), *extra),
                           f"{out}: held by PID {proc.pid} on {socket.gethostname()} since ",
                           f"(peft train {recipe})", "wait for it to finish or use another --output-dir")
            assert line.count("held by") == 1
        assert ((out / "recipe.yaml").read_bytes(), digests(first)) == before
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert not lock_path(out).exists(), "the lock is released when the run stops"


def test_train_is_refused_while_another_process_holds_the_folder(finished, tmp_path):
    recipe, _ = finished
    out = tmp_path / "out"
    holder = start_holder(out, "peft train other.yaml")
    try:
        for extra in ((), ("--resume",), ("--overwrite",)):
            refused(run_cli("train", str(recipe), "--output-dir", str(out), *extra),
                    f"{out}: held by PID {holder.pid} on {socket.gethostname()} since ", "(peft train other.yaml)",
                    "wait for it to finish or use another --output-dir")
        assert not out.exists()
    finally:
        stop_holder(holder)


def test_lock_left_by_a_killed_run_is_taken_over(finished, tmp_path):
    recipe, _ = finished
    out = tmp_path / "out"
    holder = start_holder(out, "peft train x.yaml")
    holder.kill()  # SIGKILL: the lock file stays, but no process holds it
    holder.wait(timeout=10)
    assert lock_path(out).exists()
    result = run_cli("train", str(recipe), "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert not lock_path(out).exists()


@pytest.mark.parametrize("command", ["export", "merge-export"])
def test_export_is_refused_while_its_out_folder_is_locked(finished, tmp_path, command):
    out = tmp_path / "exported"
    holder = start_holder(out, "peft export somewhere")
    try:
        refused(run_cli(command, str(finished[1]), "--out", str(out)), f"held by PID {holder.pid}",
                "(peft export somewhere)", "wait for it to finish or use another --out")
    finally:
        stop_holder(holder)
    assert not out.exists()
    assert run_cli(command, str(finished[1]), "--out", str(out)).exit_code == 0  # free again


def test_eval_writing_into_the_run_waits_for_its_lock_and_writing_elsewhere_does_not(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    holder = start_holder(run, "peft train r.yaml --resume")
    try:
        refused(run_cli("eval", str(run), "--report", str(run / "eval")), f"{run}: held by PID {holder.pid}",
                "wait for it to finish or use another --report")
        assert not (run / "eval").exists()
        result = run_cli("eval", str(run), "--report", str(tmp_path / "report"))
        assert result.exit_code == 0, result.output
    finally:
        stop_holder(holder)
    assert run_cli("eval", str(run), "--report", str(run / "eval")).exit_code == 0
    assert (run / "eval" / "metrics.json").is_file()


# --- resume of a finished run ---------------------------------------------------------------------------------

def test_resume_from_the_final_checkpoint_finishes_without_a_step(finished, tmp_path):
    """Killed after the last checkpoint was committed, before the final files: --resume writes them (and the final
    evaluation) from checkpoint-5, with no sixth step."""
    recipe, reference = finished
    run = copy_run(finished, tmp_path)
    for name in FINAL_FILES:
        (run / name).unlink()
    result = run_cli("train", str(recipe), "--output-dir", str(run), "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(step_losses(run)) == [1, 2, 3, 4, 5]
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 5
    got, want = load_file(run / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert all((run / name).is_file() for name in FINAL_FILES)


@pytest.mark.parametrize("checkpoints", [True, False])
def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished, tmp_path, checkpoints):
    recipe, _ = finished
    run = copy_run(finished, tmp_path)
    if not checkpoints:
        shutil.rmtree(run / "checkpoint-5")
    before = digests(run)
    result = run_cli("train", str(recipe), "--output-dir", str(run), "--resume")
    assert result.exit_code == 0, result.output
    assert "already finished at step 5" in result.output and "nothing was changed" in result.output
    assert digests(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # no lock file or staging left beside it


def test_resume_of_a_finished_run_of_another_recipe_is_refused(finished, inputs, tmp_path):
    recipe, _ = finished
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoint-5")
    other = recipe_in(tmp_path / "other", inputs, tmp_path / "unused", learning_rate=2e-3)
    before = digests(run)
    refused(run_cli("train", str(other), "--resume", "--output-dir", str(run)), "holds a run of another recipe",
            f"{run / 'recipe.yaml'}", "--output-dir")
    assert digests(run) == before


def test_stop_message_repeats_the_overrides_and_output_dir(finished, inputs, tmp_path, monkeypatch):
    """The SIGTERM line's command, followed literally (shell-split), continues the run to its end."""
    recipe = recipe_in(tmp_path, inputs, tmp_path / "default", save_steps=2)
    out = tmp_path / "runs" / "with space"
    original = StopOnSignal.on_step_end

    def terminated_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3 and self.received is None:
            self.received = signal.SIGTERM  # what the SIGTERM handler records
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnSignal, "on_step_end", terminated_at_step_3)
    stopped = run_cli("train", str(recipe), "--set", "train.learning_rate=0.002", "--output-dir", str(out))
    assert stopped.exit_code == 3, stopped.output
    line = next(line for line in stopped.stderr.splitlines() if line.startswith("stopped: "))
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command == ["peft", "train", str(recipe), "--set", "train.learning_rate=0.002", "--output-dir", str(out),
                       "--resume"]
    monkeypatch.setattr(StopOnSignal, "on_step_end", original)
    resumed = run_cli(*command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(step_losses(out)) == [1, 2, 3, 4, 5] and (out / "adapter.safetensors").is_file()


# --- what --overwrite may delete ------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_holding_other_data(finished, tmp_path):
    recipe, _ = finished
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "recipe.yaml").write_text("not a run's recipe\n")
    before = digests(out)
    line = refused(run_cli("train", str(recipe), "--output-dir", str(out), "--overwrite"),
                   "holds files that are not a peftcli run (notes.txt)", "--output-dir")
    line = refused(run_cli("train", str(recipe), "--output-dir", str(out)), "holds files that are not a peftcli run")
    assert "--overwrite" not in line, "a folder that is not a run is never offered to --overwrite"
    assert digests(out) == before


def test_overwrite_replaces_an_interrupted_run(finished, tmp_path):
    """A run folder without final files (killed before its first checkpoint: recipe.yaml and log.jsonl) is a
    previous run: --overwrite replaces it."""
    recipe, _ = finished
    run = copy_run(finished, tmp_path)
    for name in FINAL_FILES:
        (run / name).unlink()
    shutil.rmtree(run / "checkpoint-5")
    (run / ".staging-checkpoint-5").mkdir()  # a save cut short
    refused(run_cli("train", str(recipe), "--output-dir", str(run)), "already holds a previous run", "--overwrite")
    result = run_cli("train", str(recipe), "--output-dir", str(run), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (run / "adapter.safetensors").is_file() and not (run / ".staging-checkpoint-5").exists()


def test_output_dir_holding_an_input_is_refused(finished, inputs, tmp_path):
    recipe, _ = finished
    before = digests(inputs)
    for flag in ((), ("--overwrite",)):
        refused(run_cli("train", str(recipe), "--output-dir", str(inputs), *flag), "an input of this recipe")
    assert digests(inputs) == before


@pytest.mark.parametrize("command", ["export", "merge-export"])
def test_export_out_inside_or_around_the_run_or_its_inputs_is_refused(finished, inputs, tmp_path, command):
    run = copy_run(finished, tmp_path)
    assert run_cli(command, str(run), "--out", str(run / "exported")).exit_code == 0  # a new folder inside: fine
    before = digests(run, inputs)
    refused(run_cli(command, str(run), "--out", str(run / "exported"), "--overwrite"), "inside the run directory")
    refused(run_cli(command, str(run), "--out", str(run / "checkpoint-5"), "--overwrite"), "checkpoint-5")
    refused(run_cli(command, str(run), "--out", str(tmp_path), "--overwrite"), "holds the run directory")
    for folder in (inputs, inputs / "model", inputs / "model" / "sub", inputs / "data"):
        refused(run_cli(command, str(run), "--out", str(folder), "--overwrite"), "an input of the run")
    assert digests(run, inputs) == before


@pytest.mark.parametrize("command", ["export", "merge-export"])
def test_export_overwrite_replaces_only_a_previous_export(finished, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "data.csv").write_text("a,b\n")
    before = digests(out)
    refused(run_cli(command, str(finished[1]), "--out", str(out), "--overwrite"), "no export or merge-export writes",
            "data.csv")
    assert digests(out) == before
    (out / "data.csv").unlink()
    assert run_cli(command, str(finished[1]), "--out", str(out)).exit_code == 2  # not empty, and not ours
    shutil.rmtree(out)
    assert run_cli(command, str(finished[1]), "--out", str(out)).exit_code == 0
    refused(run_cli(command, str(finished[1]), "--out", str(out)), "pass --overwrite to replace it")
    result = run_cli(command, str(finished[1]), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output


# --- where peft eval may write --------------------------------------------------------------------------------

@pytest.mark.parametrize("option, where, named", [
    ("--predictions", "run/log.jsonl", "the run's own log.jsonl"),
    ("--predictions", "run/checkpoint-5/predictions.jsonl", "the run's own checkpoint-5"),
    ("--report", "run", "the run's own metrics.json"),
    ("--report", "run/checkpoint-5", "the run's own checkpoint-5"),
    ("--predictions", "inputs/data/validation.jsonl", "an input of the run"),
    ("--predictions", "inputs/model/predictions.jsonl", "an input of the run"),
    ("--report", "inputs/model", "an input of the run"),
])
def test_eval_outputs_over_the_run_or_its_inputs_are_refused(finished, inputs, tmp_path, option, where, named):
    run = copy_run(finished, tmp_path)
    folders = {"run": run, "inputs": inputs}
    head, _, rest = where.partition("/")
    path = folders[head] / rest if rest else folders[head]
    before = digests(run, inputs)
    line = refused(run_cli("eval", str(run), option, str(path)), f"{option} {path}", named, "write it elsewhere")
    assert digests(run, inputs) == before and line


def test_eval_writes_beside_the_run_files_atomically(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = digests(run)
    result = run_cli("eval", str(run), "--predictions", str(run / "predictions.jsonl"), "--report", str(run / "eval"))
    assert result.exit_code == 0, result.output
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 16
    assert (run / "eval" / "metrics.json").is_file() and (run / "eval" / "per_class.json").is_file()
    after = digests(run)
    assert {k: after[k] for k in before} == before, "the run's own files are unchanged"
    assert not [p for p in run.rglob(".*")], "no temporary file is left behind"


# --- evaluate: metric scripts -----------------------------------------------------------------------------------

METRIC = '''
import pathlib
pathlib.Path(__file__).with_name("ran").write_text("the metric script ran")
'''


def test_evaluate_metric_script_needs_the_recipes_trust(finished, tmp_path):
    recipe, _ = finished
    script = tmp_path / "mymetric" / "mymetric.py"
    script.parent.mkdir()
    script.write_text(METRIC)
    spec = f"eval.metrics=[evaluate:{script.parent}]"
    refused(run_cli("validate", str(recipe), "--set", spec), f"'evaluate:{script.parent}' runs the Python script",
            "eval.trust_metric_code: true")
    refused(run_cli("train", str(recipe), "--set", spec, "--output-dir", str(tmp_path / "out")),
            "eval.trust_metric_code")
    assert not (tmp_path / "out").exists()
    result = run_cli("validate", str(recipe), "--set", spec, "--set", "eval.trust_metric_code=true")
    assert result.exit_code == 0, result.output

    run = copy_run(finished, tmp_path)  # a run whose saved recipe names the script, without the trust key
    text = (run / "recipe.yaml").read_text(encoding="utf-8")
    (run / "recipe.yaml").write_text(text + f"eval:\n  metrics: [evaluate:{script.parent}]\n", encoding="utf-8")
    refused(run_cli("eval", str(run)), "eval.trust_metric_code")
    assert not (script.parent / "ran").exists(), "an untrusted metric script ran"
