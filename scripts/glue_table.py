#!/usr/bin/env python3
"""Run every recipes/glue/sst2-<method>.yaml on GLUE SST-2, MRPC and RTE over several seeds, then build the table.

Each method keeps the hyperparameters of its SST-2 recipe; MRPC and RTE swap in their columns and files.
Jobs run in a pool of worker processes (one import of torch each), so many small runs share one GPU.

  python scripts/glue_table.py --model .gpu-bundle/minilm-fp16 --data .gpu-bundle/data \\
      --tasks SST-2,MRPC,RTE --seeds 1,2,3 --workers 12 --out runs/glue --budget-minutes 8

Writes runs/glue/<task>/<method>/seed<k>/ (ordinary run directories) and runs/glue/table.{md,csv,json,png}
through `peft compare`. Jobs still queued when the budget runs out are listed as not run, never guessed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# GLUE as the task defines it: columns and dev-split metrics (MRPC: F1 and accuracy).
TASKS = {
    "SST-2": {"text": "sentence", "label": "label", "metrics": ["accuracy"]},
    "MRPC": {"text": "#1 String", "text_pair": "#2 String", "label": "Quality", "metrics": ["accuracy", "f1"]},
    "RTE": {"text": "sentence1", "text_pair": "sentence2", "label": "label", "metrics": ["accuracy"]},
}


def job_overrides(task: str, data: Path, model: str | None, seed: int, rows: int | None, extra: list[str]):
    spec = TASKS[task]
    quoted = json.dumps  # a JSON string is a YAML string: MRPC's "#1 String" would otherwise start a comment
    sets = [f"data.train={quoted(str(data / 'glue' / task / 'train.tsv'))}",
            f"data.eval={quoted(str(data / 'glue' / task / 'dev.tsv'))}",
            f"data.text={quoted(spec['text'])}", f"data.label={quoted(spec['label'])}", f"train.seed={seed}",
            f"eval.metrics=[{', '.join(spec['metrics'])}]", "train.logging_steps=50",
            "data.limit={}" if rows is None else f"data.limit={{train: {rows}}}"]
    if "text_pair" in spec:
        sets += [f"data.text_pair={quoted(spec['text_pair'])}", "data.max_length=128"]
    if model:
        sets.append(f"model.name_or_path={quoted(model)}")
    return sets + extra


def run_job(job: dict) -> dict:
    """Worker: one training run through the same code path as `peft train`."""
    from peftcli import commands
    from peftcli.errors import UserError

    started = time.time()
    try:
        commands.train(job["recipe"], job["sets"], job["out"], overwrite=True)
        return {**job, "ok": True, "seconds": time.time() - started}
    except (UserError, Exception) as exc:  # a failing method is reported in the table notes, not fatal
        return {**job, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "seconds": time.time() - started}


def build_jobs(args) -> list[dict]:
    recipes = sorted((REPO / "recipes" / "glue").glob("sst2-*.yaml"))
    wanted = set(args.methods.split(",")) if args.methods != "all" else None
    jobs = []
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: every method gets seed 1 before seed 2
        for task in args.tasks.split(","):
            for recipe in recipes:
                name = recipe.stem[len("sst2-"):]
                if wanted and name not in wanted:
                    continue
                rows = args.train_rows if task == "SST-2" else None
                sets = job_overrides(task, Path(args.data), args.model, seed, rows, args.set or [])
                out = Path(args.out) / task / name / f"seed{seed}"
                jobs.append({"recipe": str(recipe), "sets": sets, "out": str(out), "task": task, "method": name,
                             "seed": seed})
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model folder (default: each recipe's own)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--tasks", default="SST-2,MRPC,RTE")
    parser.add_argument("--methods", default="all", help="comma list of recipe names (sst2-<name>.yaml)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--train-rows", type=int, default=None, help="SST-2 training rows (default: all 67,349)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--budget-minutes", type=float, default=None, help="stop starting jobs after this")
    parser.add_argument("--out", default="runs/glue")
    parser.add_argument("--set", action="append", help="extra override for every job, e.g. train.bf16=true")
    args = parser.parse_args()
    jobs = build_jobs(args)
    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
    results, skipped = [], []
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=8) as pool:
        pending = [pool.apply_async(run_job, (job,)) for job in jobs]
        for job, handle in zip(jobs, pending):
            remaining = None if deadline is None else max(1.0, deadline - time.time())
            try:
                result = handle.get(timeout=remaining)
            except mp.TimeoutError:
                skipped.append(job)
                continue
            results.append(result)
            print(json.dumps({k: result[k] for k in ("task", "method", "seed", "ok", "seconds")}), flush=True)
        pool.terminate()
    finish(args, results, skipped)


def finish(args, results: list[dict], skipped: list[dict]) -> None:
    from peftcli.compare import compare

    done = [r["out"] for r in results if r["ok"]]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = compare(done, str(Path(args.out) / "table")) if done else "no run finished\n"
    notes = {"failed": [{k: r[k] for k in ("task", "method", "seed", "error")} for r in results if not r["ok"]],
             "not_run": [{k: j[k] for k in ("task", "method", "seed")} for j in skipped],
             "command": " ".join(sys.argv)}
    (Path(args.out) / "notes.json").write_text(json.dumps(notes, indent=2), encoding="utf-8")
    print(table)
    print(json.dumps({"finished": len(done), "failed": len(notes["failed"]), "not_run": len(skipped)}))


if __name__ == "__main__":
    main()
