"""What a run reads and writes: no pickle anywhere, no secret copied from the environment, NaN and OOM stops."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from peftcli.training import checkpoints as checkpoint
from runhelp import run_cli, run_subprocess, write_recipe

CANARIES = {"HF_TOKEN": "hf_canary_7f3a9c", "WANDB_API_KEY": "wandb_canary_51be2d",
            "HUGGING_FACE_HUB_TOKEN": "hub_canary_0c4e88"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def looks_pickled(data: bytes) -> bool:
    """Pickle protocol 2-5 opcode, or torch.save's zip container."""
    return (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5) or data.startswith(b"PK\x03\x04")


def test_a_run_writes_no_pickle_and_no_secret(tiny_bert, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_bert, out, num_train_epochs=1, save_steps=3)
    result = run_subprocess("train", str(recipe), env=CANARIES)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.parent.name == "checkpoint-6" for p in files), "expected committed checkpoints to scan"
    for path in files:
        data = path.read_bytes()
        assert not path.name.endswith(PICKLE_SUFFIXES), path
        assert not looks_pickled(data), f"{path} is pickled"
        for secret in CANARIES.values():
            assert secret.encode() not in data, f"{path} holds a secret from the environment"
    for secret in CANARIES.values():
        assert secret not in result.stdout + result.stderr


def test_a_planted_pickle_payload_never_executes(tiny_bert, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    recipe = write_recipe(tmp_path, model, tmp_path / "out")
    result = run_cli("train", str(recipe))
    assert result.exit_code == 2 and "pickle weights" in result.output, result.output
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "out").exists()


def stopped_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("stopped: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _failing_compute_loss(monkeypatch, at_call: int, failure):
    from peftcli.training.trainer import PeftTrainer

    original, calls = PeftTrainer.compute_loss, []

    def compute_loss(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return failure(loss) if len(calls) >= at_call else loss

    monkeypatch.setattr(PeftTrainer, "compute_loss", compute_loss)


def test_nan_loss_stops_within_the_step_and_keeps_the_last_checkpoint(tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_bert, out, gradient_accumulation_steps=1, save_steps=1)
    _failing_compute_loss(monkeypatch, 3, lambda loss: loss * float("nan"))
    result = run_cli("train", str(recipe))
    assert result.exit_code == 4, result.output
    line = stopped_line(result)
    assert "loss became nan at step 3" in line and "dtype float32" in line and "loss scale none" in line, line
    assert checkpoint.find_latest(out) == out / "checkpoint-2"
    assert not (out / "checkpoint-3").exists()


def test_out_of_memory_reports_the_knobs_and_commits_nothing_partial(tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_bert, out, gradient_accumulation_steps=1, save_steps=2)

    def oom(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _failing_compute_loss(monkeypatch, 5, oom)
    result = run_cli("train", str(recipe))
    assert result.exit_code == 5, result.output
    line = stopped_line(result)
    assert "per_device_train_batch_size 4" in line and "max_length 32" in line and "gradient_checkpointing" in line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY"])
def test_env_secrets_cannot_be_interpolated_into_a_recipe(name, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv(name, "canary-secret-value")
    recipe = write_recipe(tmp_path, tiny_bert, tmp_path / "out")
    text = recipe.read_text().replace("seed: 3", f"seed: 3\n  run_name: ${{env:{name}}}")
    Path(recipe).write_text(text)
    result = run_cli("train", str(recipe))
    assert result.exit_code == 2 and "would copy a secret" in result.output
    assert "canary-secret-value" not in result.output


def test_deepspeed_settings_that_disagree_with_the_recipe_give_a_one_line_error():
    """transformers raises a ValueError listing the DeepSpeed settings the recipe contradicts; peft train turns it
    into exit 2 with the fix."""
    from peftcli.training.crash_safety import deepspeed_mismatch_message

    text = ("Please correct the following DeepSpeed config values that mismatch TrainingArguments values:\n"
            "- ds bf16.enabled=True vs hf bf16|bf16_full_eval=False\n"
            "The easiest method is to set these DeepSpeed config values to 'auto'.")
    message = deepspeed_mismatch_message(text)
    assert "\n" not in message and "ds bf16.enabled=True vs hf bf16|bf16_full_eval=False" in message
    assert "train.bf16: true" in message
