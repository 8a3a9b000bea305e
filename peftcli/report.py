"""What a run tells a person: the loss-curve PNG and the model card README.md."""
from __future__ import annotations

import io
import json
from pathlib import Path

from .recipe import dump_recipe
from .runs import atomic_write


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
- training time: {train_seconds:.1f} s

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


def run_info(log_history: list[dict], seconds: float, num_examples: int) -> dict:
    """Cost figures of a run for results tables: time, throughput, peak memory and the hardware."""
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
    return {"train_seconds": round(seconds, 2), "train_examples": num_examples,
            "train_samples_per_second": summary.get("train_samples_per_second"),
            "peak_memory_mib": round(peak_mib, 1), "peak_memory_kind": "cuda allocated" if torch.cuda.is_available()
            else "process max RSS", "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__}
