"""Slow tier: real model, real data. LoRA and full fine-tuning of MiniLM on 2,000 SST-2 rows reach >= 78% dev."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftcli.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sst2-lora.yaml", "sst2-full.yaml"])
def test_sst2_dev_accuracy(recipe, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_DATA", str(shared_data))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(REPO / "recipes" / "glue" / recipe), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.78, metrics
