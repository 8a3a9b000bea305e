"""scripts/bench_throughput.py --tiny runs every non-compiled variant on CPU and prints one JSON line each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_throughput.py"


def test_bench_tiny_runs_and_reports_ratios(tmp_path):
    variants = "hf-peft-lora,full,peftcli-lora,curve"
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--variants", variants,
                             "--out", str(tmp_path / "bench.jsonl")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["variant"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == set(variants.split(",")) | {"ratios"}
    for name in ("hf-peft-lora", "full", "peftcli-lora"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["measured_steps"] == 2
    # Same base model, same batch, LoRA B = 0 at init: both LoRA variants start from the base model's loss.
    assert rows["peftcli-lora"]["n_lora"] == rows["hf-peft-lora"]["n_lora"] > 0
    assert rows["curve"]["peftcli_max_rel_diff"] < 1e-3
    assert "peftcli-lora/hf-peft-lora tokens_per_s" in rows["ratios"]
    assert len((tmp_path / "bench.jsonl").read_text().splitlines()) == len(rows)
