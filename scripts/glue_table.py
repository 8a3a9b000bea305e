#!/usr/bin/env python3
"""Run every SST-2 method recipe on GLUE SST-2, MRPC and RTE over several seeds, then build the table.

Recipes: recipes/glue/sst2-<method>.yaml and recipes/prompt/sst2_<method>.yaml. Each method keeps the learning
rate and options of its SST-2 recipe; MRPC and RTE swap in their columns and files and scale the recipe's epochs
by a per-task factor. That factor is either given (--epochs-scale MRPC=6,RTE=6) or chosen by a small sweep on the
dev split (--sweep-scales 1,3,6 over --sweep-methods, one seed kept out of the reported ones); the sweep's table
is written beside the main one so the choice is on record.

Runs that need earlier runs get them from the same task and seed: AdapterFusion's `method.sources` and
distillation's `distill.teacher` name `runs/sst2-<name>` in their recipes, which becomes that job's run directory;
such jobs start once their sources have finished.

GLoRA runs as its paper does under the method key `glora-searched` (one job per task and seed, from
recipes/glue/sst2-glora.yaml): the supernet trains into runs/glue/glora-supernet/<task>/seed<k>/, `peft glora-search`
scores its per-layer paths and ranks on train rows the supernet never saw (those past data.limit.train;
--glora-search-rows of them) and writes sst2-glora-searched.yaml beside it, and the chosen subnet is fine-tuned from
the supernet's weights into runs/glue/<task>/glora-searched/seed<k>/ (the table's row sst2-glora-searched). SST-2's
hold-out is the train file past --train-rows; MRPC and RTE (and SST-2 without --train-rows) train both steps on all
but the last 500 train rows, which the search scores on (notes.json says so). The `glora` row stays the supernet alone.

  python scripts/glue_table.py --model .gpu-bundle/minilm-fp16 --data .gpu-bundle/data \\
      --tasks SST-2,MRPC,RTE --seeds 1,2,3 --workers 14 --out runs/glue --budget-minutes 8 --sweep-scales 1,3,6

Writes runs/glue/<task>/<method>/seed<k>/ (ordinary run directories), runs/glue/table.{md,csv,json,png} through
`peft compare`, runs/glue/notes.json (command, epoch scales, failures, jobs not run). Jobs still queued when the
budget runs out are listed as not run, never guessed. `--render RUN_ROOT...` rebuilds the table and the per-task
Markdown of docs/RESULTS.md from run directories of one or several invocations.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# GLUE as the task defines it: columns and dev-split metrics (MRPC: F1 and accuracy).
TASKS = {
    "SST-2": {"text": "sentence", "label": "label", "metrics": ["accuracy"]},
    "MRPC": {"text": "#1 String", "text_pair": "#2 String", "label": "Quality", "metrics": ["accuracy", "f1"]},
    "RTE": {"text": "sentence1", "text_pair": "sentence2", "label": "label", "metrics": ["accuracy"]},
    # STS-B: a 0-5 similarity score, trained as regression; GLUE reports Pearson and Spearman.
    "STS-B": {"text": "sentence1", "text_pair": "sentence2", "label": "score", "metrics": ["pearson", "spearman"],
              "sets": ["model.num_labels=1"]},
    # CoLA's files have no header: source, label, original label mark, sentence.
    "CoLA": {"text": "sentence", "label": "label", "metrics": ["mcc"],
             "sets": ["data.columns=[source, label, orig_label, sentence]"]},
}
SOURCE_RUN = re.compile(r"^runs/(sst2[-_][\w-]+)$")  # how a recipe names another recipe's run
GLORA_SEARCHED = "glora-searched"  # method key of GLoRA's supernet -> search -> fine-tune job
SUPERNETS = "glora-supernet"  # folder under the run root of those jobs' supernets: not rows of the table
SEARCH_HOLDOUT = 500  # train rows kept for the search where the task's train split would otherwise be used whole


def recipes() -> dict[str, Path]:
    """Method name -> recipe: sst2-lora.yaml -> lora, sst2_prefix_tuning.yaml -> prefix_tuning."""
    found = sorted((REPO / "recipes" / "glue").glob("sst2-*.yaml")) + sorted(
        (REPO / "recipes" / "prompt").glob("sst2_*.yaml"))
    return {path.stem[len("sst2-"):]: path for path in found}


def recipe_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def task_overrides(task: str, data: Path, model: str | None, seed: int, rows: int | None) -> list[str]:
    spec = TASKS[task]
    quoted = json.dumps  # a JSON string is a YAML string: MRPC's "#1 String" would otherwise start a comment
    sets = [f"data.train={quoted(str(data / 'glue' / task / 'train.tsv'))}",
            f"data.eval={quoted(str(data / 'glue' / task / 'dev.tsv'))}",
            f"data.text={quoted(spec['text'])}", f"data.label={quoted(spec['label'])}", f"train.seed={seed}",
            f"eval.metrics=[{', '.join(spec['metrics'])}]", "train.logging_steps=50",
            "data.limit={}" if rows is None else f"data.limit={{train: {rows}}}"]
    if "text_pair" in spec:
        sets += [f"data.text_pair={quoted(spec['text_pair'])}", "data.max_length=128"]
    sets += spec.get("sets", [])
    if model:
        sets.append(f"model.name_or_path={quoted(model)}")
    return sets


@functools.lru_cache(maxsize=None)  # once per task, not per seed
def train_size(recipe: Path, task: str, data: str) -> int:
    """Rows of the task's train file as `peft train` reads them, before any data.limit."""
    from peftcli.data.readers import load_splits
    from peftcli.methods.recipes import load_recipe

    loaded = load_recipe(recipe, task_overrides(task, Path(data), None, 0, None))
    return len(load_splits(loaded.data, 0)[0])


def make_job(args, name: str, recipe: Path, task: str, seed: int, scale: float, root: Path) -> dict:
    raw = recipe_yaml(recipe)
    rows = args.train_rows if task == "SST-2" else None
    if name == GLORA_SEARCHED and rows is None:  # the search needs train rows that no training step reads
        rows = train_size(recipe, task, args.data) - SEARCH_HOLDOUT
    sets = task_overrides(task, Path(args.data), args.model, seed, rows)
    epochs = raw.get("train", {}).get("num_train_epochs", 3)
    if scale != 1:
        sets.append(f"train.num_train_epochs={round(epochs * scale, 3)}")
    sets += args.set or []
    out = root / task / name / f"seed{seed}"
    needs: list[str] = []
    sources = raw.get("method", {}).get("sources")
    if isinstance(sources, list):
        mapped = [_source_out(s, root, task, seed) for s in sources]
        needs += mapped
        sets.append(f"method.sources=[{', '.join(json.dumps(m) for m in mapped)}]")
    teacher = raw.get("distill", {}).get("teacher") if isinstance(raw.get("distill"), dict) else None
    if teacher:
        mapped = _source_out(teacher, root, task, seed)
        needs.append(mapped)
        sets.append(f"distill.teacher={json.dumps(mapped)}")
    job = {"recipe": str(recipe), "sets": sets, "out": str(out), "task": task, "method": name, "seed": seed,
           "epochs": round(epochs * scale, 3), "needs": needs}
    if name == GLORA_SEARCHED:
        job.update(kind=GLORA_SEARCHED, supernet=str(root / SUPERNETS / task / f"seed{seed}"),
                   search_rows=args.glora_search_rows)
    return job


def _source_out(value: str, root: Path, task: str, seed: int) -> str:
    match = SOURCE_RUN.match(str(value))
    if not match:
        return str(value)  # a path outside the table's runs: used as written
    return str(root / task / match.group(1)[len("sst2-"):] / f"seed{seed}")


def run_job(job: dict) -> dict:
    """Worker: one training run through the same code path as `peft train` (GLoRA's searched job: three steps)."""
    from peftcli.workflows import train as commands

    started = time.time()
    try:
        if job.get("kind") == GLORA_SEARCHED:
            run_glora_searched(job)
        else:
            commands.train(job["recipe"], job["sets"], job["out"], overwrite=True)
        return {**job, "ok": True, "seconds": time.time() - started}
    except Exception as exc:  # a failing method is reported in the table notes, not fatal
        return {**job, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "seconds": time.time() - started}


def run_glora_searched(job: dict) -> None:
    """`peft train` of the supernet, `peft glora-search` on it, `peft train` of the recipe it writes. That recipe
    copies the supernet's resolved one (task files and columns, data.limit, scaled epochs, seed), so the fine-tune
    needs no overrides of its own and trains on the same rows as the supernet."""
    from peftcli.workflows import train as commands
    from peftcli.workflows.glora_search import SearchOptions, search

    supernet = Path(job["supernet"])
    commands.train(job["recipe"], job["sets"], str(supernet), overwrite=True)
    # the file's stem names the table row (compare.recipe_name): sst2-glora-searched
    found = search(str(supernet), str(supernet / f"sst2-{GLORA_SEARCHED}.yaml"), job["out"],
                   SearchOptions(search_rows=job["search_rows"], seed=job["seed"]))
    commands.train(found["recipe"], [], job["out"], overwrite=True)


def pin_device(devices, gpus: int, threads: int) -> None:
    """Worker start-up: see one GPU only (before torch is imported), so `cuda` means that GPU, and use an even
    share of the CPU cores. Without the share every worker's torch starts one thread per core: 28 workers on 32
    cores oversubscribe the CPU many times over, and CPU-heavy steps (the SVD method's decomposition at inject)
    crawl."""
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)
    index = devices.get()
    if gpus > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    import torch

    torch.set_num_threads(threads)


class Scheduler:
    """A process pool that starts jobs in the order given, holds each until the runs it needs have finished,
    and stops starting jobs at the deadline."""

    def __init__(self, workers: int, deadline: float | None, gpus: int = 1):
        context = mp.get_context("spawn")
        devices = context.Queue()
        for worker in range(workers):  # workers spread round-robin over the GPUs, one device each
            devices.put(worker % max(gpus, 1))
        # no max_tasks_per_child: with it, Python 3.11 can leave queued jobs with no worker (CPython gh-115634)
        threads = max(1, (os.cpu_count() or 1) // workers)  # an even share of the cores each
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=pin_device,
                                        initargs=(devices, gpus, threads))
        self.deadline, self.waiting, self.running = deadline, [], {}
        self.results: dict[str, dict] = {}
        self.not_run: list[dict] = []

    def add(self, jobs: list[dict]) -> None:
        self.waiting += jobs
        self._start_ready()

    def _start_ready(self) -> None:
        still = []
        for job in self.waiting:
            failed = [n for n in job["needs"] if n in self.results and not self.results[n]["ok"]]
            if failed:
                self.results[job["out"]] = {**job, "ok": False, "seconds": 0.0,
                                            "error": f"a source run failed: {failed[0]}"}
            elif all(n in self.results for n in job["needs"]):
                self.running[self.pool.submit(run_job, job)] = job
            else:
                still.append(job)
        self.waiting = still

    def drain(self, until=lambda: False) -> None:
        """Collect results until nothing runs (or `until()` holds); past the deadline, queued jobs are not run."""
        while self.running and not until():
            timeout = None if self.deadline is None else max(1.0, self.deadline - time.time())
            done, _ = wait(list(self.running), timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                self._stop()
                return
            for future in done:
                job = self.running.pop(future)
                result = future.result() if future.exception() is None else {
                    **job, "ok": False, "error": repr(future.exception())[:300], "seconds": 0.0}
                self.results[job["out"]] = result
                print(json.dumps({k: result.get(k) for k in ("task", "method", "seed", "epochs", "ok", "seconds")}),
                      flush=True)
            self._start_ready()

    def _stop(self) -> None:
        for future, job in self.running.items():
            if not future.cancel():
                job = {**job, "note": "still running at the deadline"}
            self.not_run.append(job)
        self.not_run += self.waiting
        self.running, self.waiting = {}, []
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)


def done_keys(path: Path) -> set[str]:
    """TASK/method/seedN of finished jobs, from a list of such lines or from per-run rows (.runs.json)."""
    text = path.read_text(encoding="utf-8")
    if not path.name.endswith(".json"):
        return set(text.split())
    return {f"{row['data']}/{row['recipe'][len('sst2-'):]}/seed{row['seed']}" for row in json.loads(text)}


def without_done(jobs: list[dict], done: set[str], root: Path) -> list[dict]:
    """Drop jobs listed as TASK/method/seedN (finished by an earlier invocation), except those that a kept job
    needs as its source run: their run directories are not on this machine."""
    key = lambda job: str(Path(job["out"]).relative_to(root))
    kept = [job for job in jobs if key(job) not in done]
    needed = {n for job in kept for n in job["needs"]}
    return [job for job in jobs if key(job) not in done or job["out"] in needed]


def glue_score(metrics: dict, task: str) -> float:
    """GLUE's per-task score: the mean of the task's metrics (MRPC: accuracy and F1; STS-B: Pearson and
    Spearman; CoLA: Matthews correlation; the others accuracy)."""
    names = TASKS[task]["metrics"]
    return statistics.fmean(metrics.get(f"eval_{n}", metrics.get(n, 0.0)) for n in names)


def sweep(args, scheduler: Scheduler, root: Path, all_recipes: dict) -> dict:
    """Per task, the epoch scale with the best mean dev score over the sweep methods (one seed, not reported)."""
    scales = [float(s) for s in args.sweep_scales.split(",")]
    tasks = [t for t in args.tasks.split(",") if t != "SST-2"]
    jobs = []
    for task in tasks:
        for scale in scales:
            for name in args.sweep_methods.split(","):
                job = make_job(args, name, all_recipes[name], task, args.sweep_seed, scale,
                               root / "sweep" / f"x{scale:g}")
                jobs.append({**job, "scale": scale})
    scheduler.add(jobs)
    return {"jobs": jobs, "scales": scales, "tasks": tasks}


def choose_scales(plan: dict, scheduler: Scheduler) -> tuple[dict, list[dict]]:
    rows, chosen = [], {}
    for task in plan["tasks"]:
        best = None
        for scale in plan["scales"]:
            scores = []
            for job in plan["jobs"]:
                if job["task"] == task and job["scale"] == scale:
                    result = scheduler.results.get(job["out"], {})
                    metrics = _json(Path(job["out"]) / "metrics.json") if result.get("ok") else {}
                    score = glue_score(metrics, task) if metrics else None
                    rows.append({"task": task, "scale": scale, "method": job["method"], "score": score})
                    if score is not None:
                        scores.append(score)
            mean = statistics.fmean(scores) if scores else None
            if mean is not None and (best is None or mean > best[1]):
                best = (scale, mean)
        chosen[task] = best[0] if best else 1.0
    return chosen, rows


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def parse_scales(text: str | None) -> dict:
    if not text:
        return {}
    return {k: float(v) for k, v in (item.split("=") for item in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model folder (default: each recipe's own)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--tasks", default="SST-2,MRPC,RTE")
    parser.add_argument("--methods", default="all", help="comma list of recipe names (sst2-<name>.yaml)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--train-rows", type=int, default=None, help="SST-2 training rows (default: all 67,349)")
    parser.add_argument("--epochs-scale", help="per-task epoch factor, e.g. MRPC=6,RTE=6 (SST-2 keeps the recipe's)")
    parser.add_argument("--sweep-scales", help="choose the MRPC/RTE epoch factor from these, e.g. 1,3,6")
    parser.add_argument("--sweep-methods", default="full,lora,adapter,bitfit")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--glora-search-rows", type=int, default=1000,
                        help=f"{GLORA_SEARCHED}: held-out train rows that score each search candidate")
    parser.add_argument("--skip-done", help="jobs finished by earlier invocations: a file of TASK/method/seedN lines, "
                                            "or a table's .runs.json")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=1, help="spread the workers over this many GPUs")
    parser.add_argument("--budget-minutes", type=float, default=None, help="stop starting jobs after this")
    parser.add_argument("--out", default="runs/glue")
    parser.add_argument("--set", action="append", help="extra override for every job, e.g. train.bf16=true")
    parser.add_argument("--render", nargs="*", metavar="RUN_ROOT",
                        help="only rebuild table + Markdown from the run directories under these roots")
    parser.add_argument("--prior-runs", help="with --render: per-run rows (an earlier table's .runs.json) of runs "
                                             "whose directories are gone; a run directory of the same task, "
                                             "recipe and seed replaces its row")
    parser.add_argument("--recover-runs", metavar="TABLE_JSON",
                        help="write per-run rows (<--out>.runs.json) recovered from a table of one or two seeds")
    args = parser.parse_args()
    if args.recover_runs:
        recovered = recover_runs(json.loads(Path(args.recover_runs).read_text(encoding="utf-8")))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".runs.json").write_text(json.dumps(recovered, indent=1), encoding="utf-8")
        return
    if args.render is not None:
        prior = json.loads(Path(args.prior_runs).read_text(encoding="utf-8")) if args.prior_runs else []
        render(args.render, Path(args.out), prior)
        return
    root = Path(args.out)
    all_recipes = {**recipes(), GLORA_SEARCHED: REPO / "recipes" / "glue" / "sst2-glora.yaml"}
    wanted = list(all_recipes) if args.methods == "all" else args.methods.split(",")
    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
    scheduler = Scheduler(args.workers, deadline, args.gpus)
    scales = {"SST-2": 1.0, **parse_scales(args.epochs_scale)}
    plan = sweep(args, scheduler, root, all_recipes) if args.sweep_scales else None
    seeds = [int(s) for s in args.seeds.split(",")]

    done = done_keys(Path(args.skip_done)) if args.skip_done else set()

    def queue(tasks: list[str]) -> None:
        jobs = [make_job(args, name, all_recipes[name], task, seed, scales.get(task, 1.0), root)
                for seed in seeds for task in tasks for name in wanted]  # seed-major order
        scheduler.add(without_done(jobs, done, root))

    tasks = args.tasks.split(",")
    ready = [t for t in tasks if t == "SST-2" or plan is None]
    queue(ready)
    sweep_rows = []
    if plan:  # MRPC/RTE wait for the sweep while SST-2 jobs keep the workers busy
        sweep_outs = {j["out"] for j in plan["jobs"]}
        scheduler.drain(until=lambda: sweep_outs <= set(scheduler.results))
        chosen, sweep_rows = choose_scales(plan, scheduler)
        scales.update(chosen)
        print(json.dumps({"epoch_scales": scales}), flush=True)
        queue([t for t in tasks if t not in ready])
    scheduler.drain()
    finish(args, scheduler, scales, sweep_rows)


def finish(args, scheduler: Scheduler, scales: dict, sweep_rows: list[dict]) -> None:
    from peftcli.runs.compare import compare

    root = Path(args.out)
    results = [r for r in scheduler.results.values() if "/sweep/" not in r["out"].replace("\\", "/")]
    done = [r["out"] for r in results if r["ok"]]
    root.mkdir(parents=True, exist_ok=True)
    table = compare(done, str(root / "table")) if done else "no run finished\n"
    notes = {"command": " ".join(sys.argv), "epoch_scales": scales, "sweep": sweep_rows,
             "failed": [{k: r.get(k) for k in ("task", "method", "seed", "error")} for r in results if not r["ok"]],
             "not_run": [{k: j.get(k) for k in ("task", "method", "seed", "note")} for j in scheduler.not_run]}
    searched = {r["task"]: recipe_yaml(Path(r["out"]) / "recipe.yaml")["data"]["limit"]["train"]  # --set included
                for r in results if r.get("kind") == GLORA_SEARCHED and r["ok"]}
    if searched:
        notes[GLORA_SEARCHED] = {
            "how": f"supernet (under {SUPERNETS}/) -> glora-search -> fine-tune of the chosen subnet; both trainings "
                   f"use the first train_limit train rows, the search scores on {args.glora_search_rows} (at most) "
                   f"of the rest, never on dev",
            "train_limit": searched}
    (root / "notes.json").write_text(json.dumps(notes, indent=2), encoding="utf-8")
    print(table)
    print(json.dumps({"finished": len(done), "failed": len(notes["failed"]), "not_run": len(scheduler.not_run)}))


def render(roots: list[str], out: Path, prior: list[dict] = ()) -> None:
    """Table files + per-task Markdown sections from finished run directories (sweep runs left out) and the
    per-run rows of earlier tables."""
    from peftcli.runs.compare import compare, read_result
    from peftcli.files import is_run_dir

    chosen: dict[str, str] = {}  # TASK/method/seedN -> run dir; a job re-run later as a source counts once
    for root in roots:
        for p in sorted(Path(root).rglob("metrics.json")):
            key = str(p.parent.relative_to(root))
            if not {"sweep", SUPERNETS} & set(p.parts) and is_run_dir(p.parent):
                chosen.setdefault(key, str(p.parent))
    dirs = sorted(chosen.values())
    fresh = {_run_key(read_result(Path(d))) for d in dirs}
    prior = [row for row in prior if _run_key(row) not in fresh]
    out.parent.mkdir(parents=True, exist_ok=True)
    compare(dirs, str(out), prior_runs=prior)
    rows = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    sections = [overview_section(rows)] + [task_section(task, [r for r in rows if r["data"] == task])
                                           for task in TASKS]
    out.with_suffix(".sections.md").write_text("\n".join(s for s in sections if s), encoding="utf-8")
    print(out.with_suffix(".sections.md").read_text(encoding="utf-8"))


def _run_key(row: dict) -> tuple:
    return row["data"], row["recipe"], row["seed"]


def recover_runs(table: list[dict]) -> list[dict]:
    """Per-run rows from a table that kept only mean and sample std per row: exact for one seed, and for two
    (the values are mean +- std/sqrt(2)) except which seed scored which, so the higher value is given to the
    first run listed. Rows of three or more seeds cannot be split and are refused."""
    runs = []
    for row in table:
        if row["seeds"] > 2:
            raise SystemExit(f"{row['data']}/{row['recipe']}: {row['seeds']} seeds cannot be recovered from mean/std")
        names = [k[:-len("_std")] for k in row if k.endswith("_std")]
        for index, run in enumerate(row["runs"]):
            sign = (1, -1)[index] if row["seeds"] == 2 else 0
            metrics = {n: row[n] + sign * row[f"{n}_std"] / 2 ** 0.5 for n in names}
            runs.append({"run": run, "method": row["method"], "recipe": row["recipe"], "data": row["data"],
                         "seed": int(re.search(r"seed(\d+)", run).group(1)), "metrics": metrics,
                         "trainable_params": row["trainable_params"], "trainable_pct": row["trainable_pct"],
                         "train_seconds": row["train_seconds"], "train_samples_per_second": row["samples_per_second"],
                         "peak_memory_mib": row["peak_memory_mib"], "device": row["device"],
                         "recovered": "from its table row's mean and std" if row["seeds"] == 2 else "one seed"})
    return runs


def overview_section(rows: list[dict]) -> str:
    """One row per recipe, one column per task: mean ± std over seeds (seed count in brackets)."""
    by_recipe: dict[str, dict] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], {"method": r["method"], "pct": r["trainable_pct"]})[r["data"]] = r
    head = ["recipe", "method", "trained %"] + [f"{t} {'/'.join(TASKS[t]['metrics'])}" for t in TASKS]
    lines = ["### All tasks", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(r, task):
        if r is None:
            return "not run"
        values = [r.get(m) for m in TASKS[task]["metrics"]]
        if any(v is None for v in values):
            return "n/a"
        return " / ".join(f"{100 * v:.1f} ± {100 * r.get(m + '_std', 0):.1f}"
                          for v, m in zip(values, TASKS[task]["metrics"])) + f" ({r['seeds']})"

    order = sorted(by_recipe, key=lambda k: -(by_recipe[k].get("SST-2", {}).get("accuracy") or 0))
    for name in order:
        entry = by_recipe[name]
        lines.append(f"| {name} | {entry['method']} | {entry['pct']:.2f} | "
                     + " | ".join(cell(entry.get(t), t) for t in TASKS) + " |")
    return "\n".join(lines) + "\n"


def task_section(task: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    metrics = TASKS[task]["metrics"]
    rows = sorted(rows, key=lambda r: -statistics.fmean(r.get(f"eval_{m}") or r.get(m) or 0 for m in metrics))
    head = " / ".join(metrics)
    lines = [f"### {task}", "", f"| recipe | method | seeds | trainable params | dev {head} (mean ± std, %) "
             "| train s | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        recipe = next((p for p in recipes().values() if p.stem == r["recipe"]), None)
        link = f"[{r['recipe']}](../{recipe.relative_to(REPO)})" if recipe else r["recipe"]
        cells = []
        for m in metrics:
            key = f"eval_{m}" if f"eval_{m}" in r else m
            value = r.get(key)
            cells.append("n/a" if value is None else f"{100 * value:.1f} ± {100 * r.get(key + '_std', 0):.1f}")
        lines.append(f"| {link} | {r['method']} | {r['seeds']} | {r['trainable_params']:,} "
                     f"({r['trainable_pct']:.2f}%) | {' / '.join(cells)} | {_fmt(r['train_seconds'])} "
                     f"| {_fmt(r['peak_memory_mib'])} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
