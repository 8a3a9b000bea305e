#!/usr/bin/env python3
"""Padding-free packing vs padded batches: real tokens/s of LoRA SFT on the Alpaca demo, through the Trainer.

The model has SmolLM2-135M's architecture (config + tokenizer from a folder, weights random: speed does not
depend on them). Each variant trains the same recipe for one epoch through peftcli's own plan -> model ->
PeftTrainer path; only `data.packing` and the attention implementation change. Steps after the first `--skip`
are timed (CUDA-synchronised) and the real (non-pad) tokens of those steps are counted, so tokens/s compares
useful work. The mean training loss of each variant is reported too: packing must not change it.

  python scripts/bench_packing.py --config .gpu-bundle/smollm2-config \\
      --data .gpu-bundle/instruct/alpaca_en_demo.json --batch 16 --out $OUT/packing.jsonl
  python scripts/bench_packing.py --config tests/... --tiny   # CPU smoke run

Prints one JSON line per variant and one with the packed/padded ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peftcli.methods.install import prepare_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# packed-sdpa: one row with transformers' block-diagonal mask; packed-varlen: per-example flash attention from
# the collator's boundaries (peftcli/kernels/varlen.py), the default for `data.packing`.
VARIANTS = {"padded-sdpa": (False, "sdpa"), "packed-sdpa": (True, "sdpa"), "packed-varlen": (True, "varlen")}
# --shape: SmolLM2-135M as configured, or Llama-3.2-1B's shapes (16 x 2048, GQA 32/8) with the same tokenizer.
SHAPES = {"tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16),
          "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="folder with config.json + tokenizer files")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--skip", type=int, default=5, help="untimed warm-up steps")
    p.add_argument("--rows", type=int, default=None, help="use the first N rows")
    p.add_argument("--tiny", action="store_true", help="2-layer model, fp32, for a CPU smoke run")
    p.add_argument("--shape", choices=["config", "1b"], default="config", help="model shape (random weights)")
    p.add_argument("--dtype", default="float32", help="model.dtype of the recipe (bf16 autocast either way on CUDA)")
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top ops for 3 timed steps")
    p.add_argument("--out", help="also append the JSON lines to this file")
    return p.parse_args(argv)


def make_model_folder(args, folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.config)
    for key, value in SHAPES.get("tiny" if args.tiny else args.shape, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1B random weights: slow on a CPU
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    del model
    AutoTokenizer.from_pretrained(args.config).save_pretrained(folder)


def recipe_text(args, model: Path, packing: bool, attn: str, out: Path) -> str:
    limit = f"\n  limit: {{train: {args.rows}}}" if args.rows else ""
    return f"""model:
  name_or_path: {json.dumps(str(model))}
  task: causal-lm
  dtype: {args.dtype}
  attn_implementation: {attn}
data:
  train: {json.dumps(str(Path(args.data).resolve()))}
  lm_format: alpaca
  max_length: {args.max_length}
  packing: {str(packing).lower()}{limit}
method:
  name: lora
  r: 16
  alpha: 32
  target_modules: all-linear
train:
  output_dir: {json.dumps(str(out))}
  learning_rate: 2e-4
  num_train_epochs: 1
  per_device_train_batch_size: {args.batch}
  bf16: {str(torch.cuda.is_available()).lower()}
  logging_steps: 1000000
  disable_tqdm: true
  seed: 42
"""


class TokenCountingCollator:
    """Wraps the run's collator and remembers each batch's real tokens (labels or attention mask say which)."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def run_variant(args, name: str, model_folder: Path, work: Path) -> dict:
    from transformers import TrainerCallback

    from peftcli.runs.folder import method_record
    from peftcli.workflows.plan import plan
    from peftcli.workflows.train import build_trainer
    from peftcli.models.loading import load_model
    from peftcli.methods.recipes import load_recipe

    packing, attn = VARIANTS[name]
    recipe_file = work / f"{name}.yaml"
    recipe_file.write_text(recipe_text(args, model_folder, packing, attn, work / name), encoding="utf-8")
    recipe = load_recipe(str(recipe_file), [], None)
    the_plan = plan(recipe)
    torch.manual_seed(0)
    model = load_model(recipe.model, the_plan.num_labels, the_plan.data.labels)
    model = prepare_model(model, recipe.method_name, recipe.method)
    if packing:
        model.config.use_cache = False
    (work / name).mkdir(parents=True, exist_ok=True)
    record = method_record(recipe, model, the_plan.data.labels)
    trainer = build_trainer(the_plan, model, work / name, record)
    counter = TokenCountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            _sync()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync()
            times.append(time.perf_counter() - self.started)

    trainer.add_callback(StepTimer())
    if args.profile:
        trainer.add_callback(StepProfiler(args.skip, name))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    timed, tokens = times[args.skip:], counter.tokens[args.skip:len(times)]
    return {"variant": name, "packing": packing, "attn": attn, "shape": "tiny" if args.tiny else args.shape,
            "batch": args.batch, "steps": len(times),
            "timed_steps": len(timed), "tokens_per_s": round(sum(tokens) / sum(timed), 1),
            "step_ms": round(1000 * statistics.fmean(timed), 2), "mean_loss": round(result.training_loss, 4),
            "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


class StepProfiler:
    """torch.profiler over three steps after the warm-up; prints where the step time goes."""

    def __new__(cls, start: int, name: str):
        from transformers import TrainerCallback

        class _Profiler(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == start:
                    self.prof = torch.profiler.profile(activities=_activities())
                    self.prof.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == start + 3 and hasattr(self, "prof"):
                    _sync()
                    self.prof.__exit__(None, None, None)
                    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                    print(f"profile of {name}:\n" + self.prof.key_averages().table(sort_by=sort, row_limit=15),
                          flush=True)

        return _Profiler()


def _activities():
    kinds = [torch.profiler.ProfilerActivity.CPU]
    return kinds + [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else kinds


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    args = parse(argv)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        make_model_folder(args, folder)
        for name in args.variants.split(","):
            try:
                line = run_variant(args, name, folder, Path(tmp))
            except Exception as exc:  # one failing attention path must not hide the others' numbers
                line = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
            lines.append(line)
            print(json.dumps(line), flush=True)
    by_name = {line["variant"]: line for line in lines if "tokens_per_s" in line}
    if "padded-sdpa" in by_name:
        base = by_name["padded-sdpa"]["tokens_per_s"]
        ratios = {f"{k}/padded-sdpa": round(v["tokens_per_s"] / base, 3) for k, v in by_name.items()
                  if k != "padded-sdpa"}
        lines.append({"ratios": ratios})
        print(json.dumps(lines[-1]), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
