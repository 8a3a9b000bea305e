"""`peft compare`: one table (Markdown, CSV, JSON) and a plot from finished run directories, grouped over seeds."""
from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import UserError
from ..files import METHOD_JSON, atomic_write, is_run_dir


def read_result(run_dir: Path) -> dict:
    """One row per run: what was trained, what it scored, what it cost."""
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a finished peftcli run (no recipe.yaml + {METHOD_JSON})")
    record = json.loads((run_dir / METHOD_JSON).read_text(encoding="utf-8"))
    metrics = _json_or_empty(run_dir / "metrics.json")
    info = _json_or_empty(run_dir / "run_info.json")
    import yaml

    text = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    recipe = yaml.safe_load(text)
    return {"run": str(run_dir), "method": record["method"], "recipe": recipe_name(text, record["method"]),
            "data": Path(str(recipe["data"]["train"])).parent.name,
            "seed": recipe.get("train", {}).get("seed", 42), "trainable_params": record["trainable_params"],
            "trainable_pct": 100.0 * record["trainable_params"] / max(record["total_params"], 1),
            "metrics": metrics, **{k: info.get(k) for k in ("train_seconds", "train_samples_per_second",
                                                             "peak_memory_mib", "device")},
            # The whole `peft train` (data, model load, training, saving); runs made before it was recorded: None.
            "total_seconds": info.get("seconds", {}).get("total")}


def recipe_name(text: str, fallback: str) -> str:
    """The recipe a run came from (its saved recipe opens with "# Resolved recipe of this run (from X)."): two
    recipes of one method (say LoRA with and without importance scaling) must not be averaged together."""
    match = re.match(r"# Resolved recipe of this run \(from (.+?)\)\.", text)
    return Path(match.group(1)).stem if match else fallback


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def group(rows: list[dict]) -> list[dict]:
    """Runs that differ only by seed become one row with mean and std of every metric."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        buckets[(row["data"], row["recipe"], row["method"])].append(row)
    out = []
    for (data, recipe, method), members in buckets.items():
        names = sorted({m for r in members for m in r["metrics"]})
        summary = {"data": data, "recipe": recipe, "method": method, "seeds": len(members),
                   "trainable_params": members[0]["trainable_params"], "trainable_pct": members[0]["trainable_pct"],
                   "train_seconds": _mean([r["train_seconds"] for r in members]),
                   "total_seconds": _mean([r.get("total_seconds") for r in members]),  # older .runs.json lack it
                   "samples_per_second": _mean([r["train_samples_per_second"] for r in members]),
                   "peak_memory_mib": _mean([r["peak_memory_mib"] for r in members]),
                   "device": members[0]["device"], "runs": [r["run"] for r in members]}
        for name in names:
            values = [r["metrics"][name] for r in members if name in r["metrics"]]
            summary[name] = _mean(values)
            summary[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(summary)
    return sorted(out, key=lambda r: (r["data"], r["recipe"]))


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def markdown(rows: list[dict]) -> str:
    metric_names = sorted({k for r in rows for k in r if k.endswith("_std")})
    metric_names = [k[:-4] for k in metric_names]
    head = ["data", "recipe", "method", "seeds", "trainable", *metric_names, "train s", "total s (whole peft train)",
            "samples/s", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["data"], r["recipe"], r["method"], str(r["seeds"]),
                 f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%)"]
        for name in metric_names:
            value = r.get(name)
            cells.append("" if value is None else f"{100 * value:.1f} ± {100 * r[name + '_std']:.1f}"
                         if name not in ("loss", "perplexity") else f"{value:.3f} ± {r[name + '_std']:.3f}")
        cells += [_fmt(r["train_seconds"], "{:.0f}"), _fmt(r.get("total_seconds"), "{:.0f}"),
                  _fmt(r["samples_per_second"], "{:.0f}"),
                  _fmt(r["peak_memory_mib"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def to_csv(rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r if k != "runs"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in keys})
    return buffer.getvalue()


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get(metric) is not None]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(shown)), 3.5), dpi=120)
    labels = [f"{r['data']}\n{r['recipe']}" for r in shown]
    ax.bar(labels, [r[metric] for r in shown], yerr=[r[f"{metric}_std"] for r in shown], capsize=3)
    ax.set_ylabel(metric)
    ax.tick_params(axis="x", labelsize=7, rotation=60)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def compare(run_dirs: list[str], out: str | None, metric: str | None = None, prior_runs: list[dict] = ()) -> str:
    """Build the table; with `out`, write <out>.md/.csv/.json/.png and the per-run rows to <out>.runs.json.
    `prior_runs`: per-run rows of an earlier table (its .runs.json) for runs whose directories are gone."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs and not prior_runs:
        raise UserError("peft compare: name at least one run directory")
    runs = [*prior_runs, *(read_result(d) for d in dirs)]
    rows = group(runs)
    table = markdown(rows)
    if out:
        base = Path(out)
        atomic_write(base.with_suffix(".runs.json"), json.dumps(runs, indent=1))
        atomic_write(base.with_suffix(".md"), table)
        atomic_write(base.with_suffix(".csv"), to_csv(rows))
        atomic_write(base.with_suffix(".json"), json.dumps(rows, indent=2))
        first_metric = metric or next((k[:-4] for r in rows for k in r if k.endswith("_std")), None)
        if first_metric:
            plot(rows, first_metric, base.with_suffix(".png"))
    return table
