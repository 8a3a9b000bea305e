#!/usr/bin/env python3
"""Multi-GPU checks through accelerate: DDP scaling, an FSDP run whose adapter reloads and merges, DDP resume.

Every run is `peft train` under `accelerate launch` with a config from configs/ (the launched script calls the
same `commands.train` as `python -m peftcli train`). Model: Llama-3.2-1B shapes (16 layers, hidden 2048) with
random bf16 weights and the vocabulary of the tokenizer in --config; data: the Alpaca demo; LoRA r=16 on all
linear layers. Throughput is read from the run's log.jsonl timestamps between the first logged step at or after
--warm and the last step, so start-up and warm-up are left out; samples/s counts every process's samples.

  python3 scripts/bench_multi_gpu.py --config .gpu-bundle/smollm2-config \\
      --data .gpu-bundle/instruct/alpaca_en_demo.json --out $OUT/multi_gpu.jsonl

1. DDP scaling: the same recipe (per-GPU batch fixed) on 1 GPU (configs/single_gpu.yaml) and on 2 GPUs
   (configs/ddp.yaml); prints samples/s of each and the ratio.
2. FSDP (configs/fsdp.yaml), and with `--parts zero2,zero3` DeepSpeed ZeRO-2/3 (configs/deepspeed_zero*.yaml;
   needs deepspeed installed), 2 GPUs: trains, then checks the saved adapter is whole (every LoRA tensor has its
   full shape, every lora_B moved from zero), reloads it, and merge-exports it; the merged model's logits must
   match the adapter model's.
3. DDP resume: SIGTERM to a 2-GPU job after --kill-at steps (each peftcli worker finishes its step, commits a
   checkpoint and exits 3), then `--resume`; per-step losses and the final adapter must equal those of an
   uninterrupted run of the same recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RUNNER = """import sys
sys.path.insert(0, {repo!r})
from peftcli.workflows import train as commands
from peftcli.errors import TrainingStopped, UserError
try:
    commands.train(sys.argv[1], [], sys.argv[2], resume=sys.argv[3] == "resume", overwrite=sys.argv[3] != "resume")
except (UserError, TrainingStopped) as exc:  # the exit codes `peft train` gives: 2 bad input, 3 stopped, ...
    print(f"stopped: {{exc}}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="folder with a tokenizer (and config.json for its vocabulary)")
    p.add_argument("--data", required=True, help="an Alpaca JSON file, or `fixed`: same-length synthetic rows")
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--kill-at", type=int, default=20)
    p.add_argument("--parts", default="ddp,fsdp,resume")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU/gloo smoke run of the script)")
    p.add_argument("--logging-steps", type=int, default=1,
                   help="DDP part: the Trainer syncs the GPUs to gather the loss at every logging step")
    p.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train-section key for every run, e.g. ddp_find_unused_parameters=false")
    p.add_argument("--label", default="", help="names this configuration in the JSON lines")
    p.add_argument("--out", help="also append the JSON lines to this file")
    return p.parse_args(argv)


def make_model(args, folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.config)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16) if args.tiny else dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, use_cache=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1.2B weights is slow on a CPU
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float32 if args.tiny else torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokenizer.save_pretrained(folder)


def fixed_length_data(args, folder: Path, work: Path) -> Path:
    """Alpaca rows that all tokenize past --max-length, so every batch on every GPU is the same size and the
    scaling ratio measures the GPUs, not which ranks drew the longer batches."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = len(tokenizer)  # ids 1000-2999 of a real vocabulary; a tiny test tokenizer has fewer
    words = tokenizer.convert_ids_to_tokens(list(range(min(1000, vocab // 4), min(3000, vocab))))
    rng = random.Random(0)
    rows = [{"instruction": "Continue the list.", "input": "",
             "output": " ".join(w.lstrip("Ġ▁") for w in rng.choices(words, k=2 * args.max_length))}
            for _ in range(args.batch * 2 * (args.steps + 2))]
    path = work / "fixed_length.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_recipe(args, folder: Path, path: Path, steps: int, save_steps: int | None = None,
                 logging_steps: int = 5, bf16: bool | None = None) -> Path:
    save = f"\n  save_strategy: steps\n  save_steps: {save_steps}" if save_steps else ""
    cpu = "\n  use_cpu: true" if args.tiny else ""
    extra = "".join(f"\n  {key}: {value}" for key, _, value in (o.partition("=") for o in args.train_option))
    path.write_text(f"""model:
  name_or_path: {json.dumps(str(folder))}
  task: causal-lm
data:
  train: {json.dumps(str(Path(args.data).resolve() if args.data != "fixed" else path.parent / "fixed_length.json"))}
  lm_format: alpaca
  max_length: {args.max_length}
method:
  name: lora
  r: 16
  alpha: 32
  target_modules: all-linear
train:
  learning_rate: 2e-4
  max_steps: {steps}
  per_device_train_batch_size: {args.batch}
  bf16: {str(not args.tiny if bf16 is None else bf16).lower()}
  logging_steps: {logging_steps}
  disable_tqdm: true
  seed: 42{save}{extra}{cpu}
""", encoding="utf-8")
    return path


def launch(config: str, processes: int, recipe: Path, out: Path, mode: str, work: Path, wait: bool = True):
    runner = work / "runner.py"
    runner.write_text(RUNNER.format(repo=str(REPO)), encoding="utf-8")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / config),
               "--num_processes", str(processes), "--main_process_port", str(29500 + processes),
               str(runner), str(recipe), str(out), mode]
    log = open(work / f"{out.name}-{mode}.log", "a", encoding="utf-8")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        proc.wait()
    return proc


def throughput(run: Path, batch: int, processes: int, warm: int) -> dict:
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [row for row in logged if "loss" in row and "time" in row]
    first = next(row for row in steps if row["step"] >= warm)
    last = steps[-1]
    seconds = last["time"] - first["time"]
    samples = (last["step"] - first["step"]) * batch * processes
    return {"samples_per_s": round(samples / seconds, 2), "steps_timed": last["step"] - first["step"],
            "step_ms": round(1000 * seconds / (last["step"] - first["step"]), 1), "final_loss": last["loss"]}


def shared_recipe(args, folder: Path, work: Path) -> Path:
    """One recipe for the DDP and resume parts (per-step logging, checkpoints only when stopped), so the
    DDP part's 2-GPU run doubles as the resume part's uninterrupted reference."""
    return write_recipe(args, folder, work / "ddp.yaml", args.steps, save_steps=1000,
                        logging_steps=args.logging_steps)


def ddp_config(args) -> str:
    return "cpu_ddp.yaml" if args.tiny else "ddp.yaml"  # --tiny: gloo processes on the CPU


def part_ddp(args, folder, work) -> list[dict]:
    recipe = shared_recipe(args, folder, work)
    lines = []
    for processes, config in ((1, "cpu_ddp.yaml" if args.tiny else "single_gpu.yaml"), (2, ddp_config(args))):
        out = work / f"ddp{processes}"
        proc = launch(config, processes, recipe, out, "new", work)
        line = {"part": "ddp", "label": args.label, "processes": processes, "config": config,
                "exit": proc.returncode}
        if proc.returncode == 0:
            line.update(throughput(out, args.batch, processes, args.warm))
        lines.append(line)
    if all("samples_per_s" in line for line in lines):
        lines.append({"part": "ddp", "label": args.label, "scaling_2_over_1": round(lines[1]["samples_per_s"] / lines[0]["samples_per_s"],
                                                                3)})
    return lines


# Sharded strategies: each trains on 2 GPUs, then its saved adapter must be whole and merge (part -> config).
SHARDED = {"fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


def part_sharded(args, folder, work, part: str) -> list[dict]:
    from safetensors.torch import load_file

    # DeepSpeed requires the recipe's precision to be the launch config's (bf16), on the CPU (--tiny) too
    recipe = write_recipe(args, folder, work / f"{part}.yaml", args.steps, bf16=part != "fsdp" or not args.tiny)
    out = work / part
    proc = launch(SHARDED[part], 2, recipe, out, "new", work)
    line = {"part": part, "config": SHARDED[part], "exit": proc.returncode}
    if proc.returncode != 0:
        line["log_tail"] = (work / f"{part}-new.log").read_text(encoding="utf-8")[-1500:]
        return [line]
    line.update(throughput(out, args.batch, 2, args.warm))
    saved = load_file(str(out / "adapter.safetensors"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    a_keys = [k for k in saved if k.endswith("lora_A")]
    line["lora_tensors"] = len(saved)
    line["modules_expected"] = 7 * layers
    line["lora_A_full_width"] = all(saved[k].shape[0] == 16 and saved[k].shape[1] in (
        hidden, config["intermediate_size"]) for k in a_keys)
    line["lora_B_all_moved"] = all(float(saved[k].abs().max()) > 0 for k in saved if k.endswith("lora_B"))
    line.update(check_merge(out, work / f"{part}-merged"))
    return [line]


def check_merge(run: Path, merged_dir: Path) -> dict:
    """Reload the adapter run, merge-export it, and compare both models' logits on one input."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftcli.runs.folder import load_trained
    from peftcli.workflows.merge_export import merge_export

    merge_export(str(run), str(merged_dir), overwrite=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter_model = load_trained(run)[2].to(device).float().eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(device).eval()
    ids = torch.arange(1, 65, device=device).unsqueeze(0)
    with torch.no_grad():
        a, b = adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits
    return {"merged_vs_adapter_max_abs": float((a - b).abs().max()), "logit_scale": float(a.abs().max())}


def part_resume(args, folder, work) -> list[dict]:
    """Uninterrupted 2-GPU run, then the same recipe SIGTERMed at --kill-at and resumed: per-step losses must match."""
    recipe = shared_recipe(args, folder, work)
    reference, out = work / "ddp2", work / "resume"
    if not (reference / "log.jsonl").is_file():  # the DDP part's 2-GPU run is the uninterrupted reference
        launch(ddp_config(args), 2, recipe, reference, "new", work)
    proc = launch(ddp_config(args), 2, recipe, out, "new", work, wait=False)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.is_file() else []
        if steps and max(steps) >= args.kill_at:
            os.killpg(proc.pid, signal.SIGTERM)  # the whole job, as a scheduler's preemption does
            break
        time.sleep(0.2)
    launcher_exit = proc.wait()
    wait_for_group(proc.pid)  # the launcher may exit first; the workers still finish their step and checkpoint
    stopped = [line for line in (work / "resume-new.log").read_text().splitlines() if "checkpoint committed" in line]
    resumed = launch(ddp_config(args), 2, recipe, out, "resume", work)
    line = {"part": "resume", "launcher_exit_after_sigterm": launcher_exit, "worker_message": stopped[:1],
            "resumed_exit": resumed.returncode}
    if resumed.returncode == 0:
        state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
        line["final_step"] = state.get("global_step")
        ref, got = step_losses(reference), step_losses(out)
        line["steps_compared"] = len(set(ref) & set(got))
        line["max_loss_diff_vs_uninterrupted"] = max(abs(ref[s] - got[s]) for s in set(ref) & set(got))
        line["adapters_equal"] = adapters_equal(reference, out)
    return [line]


def wait_for_group(pgid: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def step_losses(run: Path) -> dict:
    """Per-step loss; a resumed run's entries replace the killed run's for the same step."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def adapters_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def main(argv=None):
    args = parse(argv)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "model"
        make_model(args, folder)
        if args.data == "fixed":
            fixed_length_data(args, folder, work)
        for part in args.parts.split(","):
            try:
                produced = (part_sharded(args, folder, work, part) if part in SHARDED else
                            {"ddp": part_ddp, "resume": part_resume}[part](args, folder, work))
            except Exception as exc:  # report and go on: one broken part must not hide the others
                produced = [{"part": part, "error": f"{type(exc).__name__}: {exc}"[:500]}]
            for line in produced:
                print(json.dumps(line), flush=True)
            lines += produced
            if args.out:
                with open(args.out, "a", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(line) + "\n" for line in produced)
        if args.out:  # keep the launch logs of failed parts
            for log in work.glob("*.log"):
                text = log.read_text(encoding="utf-8", errors="replace")
                if "Traceback" in text:
                    Path(args.out).with_name(log.name).write_text(text[-20000:], encoding="utf-8")


if __name__ == "__main__":
    main()
