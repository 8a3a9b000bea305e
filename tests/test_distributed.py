"""Two-process CPU DDP (gloo, through `accelerate launch`) trains the same adapter as one process, same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftcli import commands
from tiny import REVIEWS

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def recipe(tmp_path, model, name, batch):
    body = {"model": {"name_or_path": str(model)},
            "data": {"train": str(REVIEWS / "train.jsonl"), "limit": {"train": 32}, "max_length": 32},
            "method": {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": ["query", "value"]},
            "train": {"output_dir": str(tmp_path / name), "max_steps": 3, "learning_rate": 1e-2, "seed": 3,
                      "per_device_train_batch_size": batch, "logging_steps": 1, "use_cpu": True}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="2-process run finishes and saves every adapter tensor, but its values differ "
                   "from the single-process run (max abs 0.015 on lora_B); data order or init across ranks "
                   "not yet aligned")
def test_cpu_ddp_matches_single_process(tiny_bert, tmp_path):
    single = commands.train(str(recipe(tmp_path, tiny_bert, "single", 4)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu_ddp.yaml"),
              "-m", "peftcli", "train", str(recipe(tmp_path, tiny_bert, "ddp", 2))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    want = load_file(str(single / "adapter.safetensors"))
    got = load_file(str(tmp_path / "ddp" / "adapter.safetensors"))
    assert set(got) == set(want) and any(k.endswith("lora_B") for k in got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6)
