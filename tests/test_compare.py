"""`peft compare`: seeds of one method are grouped into mean ± std; outputs are written as md/csv/json/png."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from peftcli.cli import app


def fake_run(folder, method, seed, accuracy, seconds, total=None):
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(f"# Resolved recipe of this run (from recipes/sst2-{method}.yaml).\n" +
                                        yaml.safe_dump({"data": {"train": "/d/SST-2/train.tsv"},
                                                        "train": {"seed": seed}}))
    (folder / "method.json").write_text(json.dumps({"method": method, "trainable_params": 100,
                                                    "total_params": 10000}))
    (folder / "metrics.json").write_text(json.dumps({"accuracy": accuracy}))
    stages = {"seconds": {"prepare_data": 1.0, "train": seconds, "total": total}} if total else {}  # None: old run
    (folder / "run_info.json").write_text(json.dumps({"train_seconds": seconds, "train_samples_per_second": 10.0,
                                                      "peak_memory_mib": 500.0, "device": "CPU", **stages}))
    return folder


def test_compare_groups_seeds(tmp_path):
    runs = [fake_run(tmp_path / f"lora{s}", "lora", s, acc, 10 * s) for s, acc in ((1, 0.80), (2, 0.90))]
    runs.append(fake_run(tmp_path / "full1", "full", 1, 0.85, 50))
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "table")])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads((tmp_path / "table.json").read_text())}
    assert rows["lora"]["seeds"] == 2 and rows["lora"]["accuracy"] == pytest.approx(0.85)
    assert rows["lora"]["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert rows["lora"]["trainable_pct"] == pytest.approx(1.0)
    assert "85.0 ± 7.1" in result.stdout and "| SST-2 | sst2-full | full | 1 |" in result.stdout
    assert (tmp_path / "table.png").stat().st_size > 0 and (tmp_path / "table.csv").is_file()


def test_compare_shows_total_time_beside_training_time(tmp_path):
    """New runs record the whole command's wall time; runs made before that still compare, with a blank total."""
    new = fake_run(tmp_path / "lora1", "lora", 1, 0.80, 12, total=831)
    old = fake_run(tmp_path / "full1", "full", 1, 0.85, 50)
    result = CliRunner().invoke(app, ["compare", str(new), str(old), "--out", str(tmp_path / "table")])
    assert result.exit_code == 0, result.output
    head, _, *rows = result.stdout.splitlines()
    cells = [c.strip() for c in head.split("|")]
    train_col, total_col = cells.index("train s"), cells.index("total s (whole peft train)")
    by_method = {row.split("|")[3].strip(): [c.strip() for c in row.split("|")] for row in rows}
    assert (by_method["lora"][train_col], by_method["lora"][total_col]) == ("12", "831")
    assert (by_method["full"][train_col], by_method["full"][total_col]) == ("50", "")
    rows = {r["method"]: r for r in json.loads((tmp_path / "table.json").read_text())}
    assert rows["lora"]["total_seconds"] == 831 and rows["full"]["total_seconds"] is None


def test_compare_rejects_non_runs(tmp_path):
    result = CliRunner().invoke(app, ["compare", str(tmp_path)])
    assert result.exit_code == 2 and "not a finished peftcli run" in result.stderr
