"""What a run tells a person: the loss-curve PNG and the model card README.md."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

from ..config.recipe import dump_recipe
from ..files import atomic_write


def plot_loss(log_history: list[dict], path: Path) -> bool:
    """Training (and eval) loss against step; returns False when nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return True


def model_card(raw_recipe: dict, record: dict, metrics: dict, train_seconds: float) -> str:
    share = 100.0 * record["trainable_params"] / max(record["total_params"], 1)
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    return f"""# {Path(raw_recipe['train']['output_dir']).name}

Fine-tuned with peftcli using **{record['method']}** on `{record['base_model']}`
(task: {record['task']}).

- trainable parameters: {record['trainable_params']:,} of {record['total_params']:,} ({share:.3f}%)
{head_lines(record)}- training time: {train_seconds:.1f} s

## Evaluation

| metric | value |
|---|---|
{rows or '| (no eval data) | |'}

## Use it

```
peft eval {raw_recipe['train']['output_dir']} --json
peft merge-export {raw_recipe['train']['output_dir']} --out {raw_recipe['train']['output_dir']}/merged
```

## Recipe

```yaml
{dump_recipe(raw_recipe)}```

## Method record

```json
{json.dumps(record, indent=2)}
```
"""


def head_lines(record: dict) -> str:
    """What the task head is and which vector it reads: a merged or exported model must read the same one."""
    lines = ""
    if record.get("head"):
        lines += f"- task head trained with the method: {', '.join(f'`{h}`' for h in record['head'])}\n"
    if record.get("pooling"):
        pooling = record["pooling"]
        how = "the architecture's own pooled vector" if pooling == "pooler" else \
            f"{pooling}-pooled tokens (`peft eval` only: a plain HF model reads its own pooled vector)"
        lines += f"- the head reads: {how}\n"
    return lines


class Stopwatch:
    """Wall time of a command's stages: each stage runs from its start() to the next one's (the last to now)."""

    def __init__(self):
        self.began = time.perf_counter()
        self.starts: dict[str, float] = {}

    def start(self, stage: str) -> None:
        self.starts[stage] = time.perf_counter() - self.began

    def seconds(self) -> dict:
        """{stage: s, ..., "total": s since the stopwatch was made}. Stages are cut at the rounded marks, so they
        sum to at most the total; the remainder is the work before the first stage (reading the recipe)."""
        total = round(time.perf_counter() - self.began, 2)
        marks = [(stage, round(at, 2)) for stage, at in self.starts.items()] + [("total", total)]
        stages = {stage: round(end - at, 2) for (stage, at), (_, end) in zip(marks, marks[1:])}
        return {**stages, "total": total}


def run_info(log_history: list[dict], seconds: float, num_examples: int, stages: dict) -> dict:
    """Cost figures of a run for results tables: time, throughput, peak memory and the hardware.
    `seconds`: the training loop alone (train_seconds, as older runs have it); `stages`: Stopwatch.seconds()."""
    import platform

    import torch
    import transformers

    summary = next((h for h in reversed(log_history) if "train_runtime" in h), {})
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"train_seconds": round(seconds, 2), "seconds": stages, "train_examples": num_examples,
            "train_samples_per_second": summary.get("train_samples_per_second"),
            "peak_memory_mib": round(peak_mib, 1), "peak_memory_kind": "cuda allocated" if torch.cuda.is_available()
            else "process max RSS", "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__}


def train_summary(run_dir: Path) -> list[str]:
    """What `peft train` prints at the end, read back from the files the run wrote (nothing is recomputed)."""
    metrics = _read_json(run_dir / "metrics.json")
    width = max(map(len, metrics), default=0)
    lines = ["final metrics on the eval data (metrics.json):" if metrics else
             "no final metrics: the recipe has no eval data (data.eval or data.eval_fraction)"]
    lines += [f"  {name:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {name:<{width}}  {value}"
              for name, value in metrics.items()]
    plots = [run_dir / "loss.png", run_dir / "confusion_matrix.png",
             *sorted(run_dir.glob("tasks/*/confusion_matrix.png"))]  # multi-task runs: one matrix per task
    lines += [f"plot: {path}" for path in plots if path.is_file()]
    stages = _read_json(run_dir / "run_info.json").get("seconds")
    if stages:
        parts = ", ".join(f"{stage} {value:.1f} s" for stage, value in stages.items() if stage != "total")
        lines.append(f"time: {stages['total']:.1f} s in all ({parts})")
    return lines


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
