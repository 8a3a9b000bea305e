"""Helpers for end-to-end run tests: a tiny recipe, running `peft` in-process or as a killable subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tiny import REVIEWS

REPO = Path(__file__).resolve().parents[1]


def write_recipe(folder: Path, model: Path, out: Path, **train) -> Path:
    """LoRA with dropout on tiny BERT: 48 rows, batch 4, 2 accumulation steps -> 6 optimizer steps per epoch."""
    recipe = {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(REVIEWS / "train.jsonl"), "limit": {"train": 48}, "max_length": 32},
        "method": {"name": "lora", "r": 4, "dropout": 0.1, "target_modules": ["query", "value"]},
        "train": {"output_dir": str(out), "learning_rate": 1e-3, "num_train_epochs": 2,
                  "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "save_strategy": "steps",
                  "save_steps": 2, "logging_steps": 1, "seed": 3, "use_cpu": True, "disable_tqdm": True, **train},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def run_cli(*args: str):
    from peftcli.cli import app

    return CliRunner().invoke(app, list(args))


def run_subprocess(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftcli", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from log.jsonl; a resumed run's later entries replace the killed run's."""
    losses = {}
    for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    return losses
