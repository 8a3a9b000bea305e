#!/usr/bin/env python3
"""Side-by-side training throughput: HF peft LoRA vs peftcli LoRA vs full fine-tuning, one JSON line each.

Random-weight Llama (Llama-3.2-1B shapes, 1.24B params, tied embeddings), bf16 weights, one fixed random token
batch, AdamW (fused on CUDA) over the trainable parameters only. Each variant runs in its own subprocess so peak
memory is its own. FLOPs per token as ../shared/bench/hf_peft_baseline.py (PaLM convention, attention non-causal):
full 6*N_mm + attn, LoRA 4*N_mm + 6*N_lora + attn; MFU = flops * tokens/s / peak (989.4 TFLOP/s bf16, H100 SXM).
The `curve` variant trains HF peft and peftcli LoRA from the same initial adapter on the same batches and reports
both loss curves. Usage:
  python scripts/bench_throughput.py                 # H100 run: all variants, then the ratios
  python scripts/bench_throughput.py --tiny --steps 2  # CPU smoke test (what CI runs)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peftcli.methods.install import prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["hf-peft-lora", "full", "peftcli-lora-unfused", "peftcli-lora", "peftcli-lora-norope",
            "peftcli-lora-noce", "peftcli-lora-cudnn",
            "peftcli-lora-compile", "peftcli-lora-cudnn-compile", "curve"]
# Other methods on the same model and batch (--variants methods): HF peft where it has the method, else ours only.
METHOD_VARIANTS = ["hf-peft-dora", "peftcli-dora", "hf-peft-ia3", "peftcli-ia3", "peftcli-adapter",
                   "hf-peft-prefix", "peftcli-prefix"]
IA3_TARGETS, IA3_FFN = ["k_proj", "v_proj", "down_proj"], ["down_proj"]  # HF peft's Llama defaults


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of {VARIANTS + METHOD_VARIANTS}, or `methods` for the second list")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # the subprocess runs exactly one
    for flag, default in (("--batch", 8), ("--seq", 2048), ("--warmup", 3), ("--steps", 10), ("--rank", 16),
                          ("--alpha", 32), ("--chunk", 2048), ("--curve-steps", 30)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--peak-tflops", type=float, default=989.4)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    p.add_argument("--profile", metavar="DIR", help="write each variant's torch profiler table (2 steps) here")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.warmup = min(args.batch, 2), min(args.seq, 32), min(args.warmup, 1)
        args.curve_steps = min(args.curve_steps, 3)
    return args


def build_base(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # Llama-3.2-1B shapes
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                          rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.train(), cfg


def hf_peft(model, args, adapter_fp32=True):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=TARGETS)
    return get_peft_model(model, cfg, autocast_adapter_dtype=adapter_fp32)  # fp32 adapters: peft's default


def peftcli_lora(model, args, fused: bool, rotary: bool = True):
    from peftcli.methods.lora import LoraConfig
    from peftcli.models.speedups import use_fused_kernels

    prepare_model(model, "lora", LoraConfig(r=args.rank, alpha=args.alpha, target_modules=TARGETS))
    if fused:
        use_fused_kernels(model, rotary=rotary)
    return model


def peftcli_loss_fn(model, args, compiled: bool):
    """The loss step as `peft train` runs it (model.chunked_loss, speedups.py): the model's own forward, whose
    head hands the hidden states to the chunked cross entropy against the (tied, frozen) lm_head weight."""
    from peftcli.models.speedups import hidden_states_to_loss, install_chunked_loss

    head = install_chunked_loss(model, chunk_tokens=args.chunk)
    if compiled:
        model.model = torch.compile(model.model)

    def loss_fn(x):
        with hidden_states_to_loss(head):
            return model(input_ids=x, labels=x).loss
    return loss_fn


def other_method(name, model, args):
    """HF peft or peftcli with DoRA, IA3, a Houlsby adapter or prefix tuning (20 virtual tokens, MLP encoder)."""
    if name.startswith("hf-peft"):
        import peft

        task = "CAUSAL_LM"
        cfg = {"hf-peft-dora": lambda: peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS,
                                                        use_dora=True, task_type=task),
               "hf-peft-ia3": lambda: peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FFN,
                                                     task_type=task),
               "hf-peft-prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True,
                                                                 encoder_hidden_size=512, task_type=task)}[name]()
        return peft.get_peft_model(model, cfg)
    from peftcli.methods.adapter import AdapterConfig
    from peftcli.methods.ia3 import Ia3Config
    from peftcli.methods.lora import LoraConfig
    from peftcli.methods.prefix_tuning import PrefixTuningConfig

    method, cfg = {"peftcli-dora": ("lora", lambda: LoraConfig(r=args.rank, alpha=args.alpha, target_modules=TARGETS,
                                                              use_dora=True)),
                   "peftcli-ia3": ("ia3", lambda: Ia3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FFN)),
                   "peftcli-adapter": ("adapter", lambda: AdapterConfig()),
                   "peftcli-prefix": ("prefix_tuning", lambda: PrefixTuningConfig())}[name]
    return prepare_model(model, method, cfg())


def make_variant(name, args, device):
    """(model, loss_fn(x) -> scalar) for one variant."""
    model, cfg = build_base(args, device)
    if name in METHOD_VARIANTS:
        model = other_method(name, model, args)
        if name.startswith("peftcli"):  # as `peft train` runs it on CUDA: fused kernels, chunked loss
            from peftcli.models.speedups import use_fused_kernels

            use_fused_kernels(model)
            return model, cfg, peftcli_loss_fn(model, args, compiled=False)
        return model, cfg, lambda x: model(input_ids=x, labels=x).loss
    if name == "hf-peft-lora":
        model = hf_peft(model, args)
    elif name.startswith("peftcli"):
        # The compile variants leave norm/MLP fusion to inductor (custom kernels would split its graphs).
        # `-norope` and `-noce` switch off one Triton kernel each (rotary; loss and gradient of a logits chunk),
        # to measure what it buys.
        if name.endswith("-noce"):
            import peftcli.models.kernels.loss as loss_kernels

            loss_kernels._fused_applies = lambda logits, softcap: False
        model = peftcli_lora(model, args, fused="unfused" not in name and "compile" not in name,
                             rotary=not name.endswith("-norope"))
        return model, cfg, peftcli_loss_fn(model, args, compiled=name.endswith("compile"))
    else:  # full fine-tuning: every parameter trains
        for p in model.parameters():
            p.requires_grad_(True)
    return model, cfg, lambda x: model(input_ids=x, labels=x).loss


def count_flops(model, cfg, args, lora: bool):
    n_mm = n_lora = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if "lora_" in name:  # HF peft's adapters are nn.Linear children
                n_lora += m.weight.numel()
                continue
            n_mm += m.weight.numel()
            n_lora += sum(p.numel() for n, p in m.named_parameters(recurse=False) if n.startswith("lora_"))
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    attn = 12 * cfg.num_hidden_layers * args.seq * d_attn
    return n_mm, n_lora, (4 * n_mm + 6 * n_lora + attn) if lora else (6 * n_mm + attn)


def train_steps(loss_fn, opt, x, n, sync):
    times, loss = [], None
    for _ in range(n):
        t = time.perf_counter()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    return times, float(loss)


def sdpa_backends(name, device):
    """`*-cudnn*` variants put SDPA's cuDNN attention first (faster than the default flash backend on Hopper)."""
    from contextlib import nullcontext

    if "cudnn" not in name or device != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return sdpa_kernel(order, set_priority=True)


def run_throughput(name, args, device):
    model, cfg, loss_fn = make_variant(name, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device,
                      generator=torch.Generator(device).manual_seed(1))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with sdpa_backends(name, device):  # compile traces the backend choice during warm-up
        train_steps(loss_fn, opt, x, args.warmup, sync)
    warm_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with sdpa_backends(name, device):
        times, loss = train_steps(loss_fn, opt, x, args.steps, sync)
    if args.profile:
        profile_steps(name, args, loss_fn, opt, x, sync)
    n_mm, n_lora, flops = count_flops(model, cfg, args, lora=name != "full")
    if name in METHOD_VARIANTS:
        n_lora, flops = 0, 4 * n_mm + 12 * cfg.num_hidden_layers * args.seq * cfg.hidden_size  # frozen-base FLOPs
    tps = args.batch * args.seq * len(times) / sum(times)
    gib = 2 ** 30
    return {"variant": name, "batch": args.batch, "seq": args.seq, "measured_steps": len(times),
            "tokens_per_s": round(tps, 1), "step_ms_median": round(1e3 * statistics.median(times), 2),
            "warmup_s": round(warm_s, 2),
            "peak_mem_alloc_gib": round(torch.cuda.max_memory_allocated() / gib, 3) if device == "cuda" else None,
            "mfu": round(flops * tps / (args.peak_tflops * 1e12), 4), "model_flops_per_token": flops,
            "n_matmul": n_mm, "n_lora": n_lora, "params_trainable": sum(p.numel() for p in params),
            "final_loss": round(loss, 4), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}


def profile_steps(name, args, loss_fn, opt, x, sync):
    """Two more steps under torch.profiler; the kernels by GPU time go to DIR/<variant>.txt (after timing, so
    the profiler's overhead never enters the reported numbers)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof, sdpa_backends(name, "cuda"):
        train_steps(loss_fn, opt, x, 2, sync)
    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    (folder / f"{name}.txt").write_text(table, encoding="utf-8")


def run_curve(args, device):
    """HF peft and peftcli LoRA from the same base and the same initial A (B = 0), same batches and optimiser.
    HF peft with bf16 adapters from the same init gives the size of bf16 noise to compare the gap against."""
    steps, batch, seq = args.curve_steps, max(1, args.batch // 4), max(16, args.seq // 2)
    gen = torch.Generator(device).manual_seed(2)
    model, cfg = build_base(args, device)
    data = [torch.randint(0, cfg.vocab_size // 8, (batch, seq), device=device, generator=gen) for _ in range(4)]
    peft_model = hf_peft(model, args)
    init_a = {n.replace("base_model.model.", "").replace(".lora_A.default.weight", ".lora_A"): p.detach().clone()
              for n, p in peft_model.named_parameters() if "lora_A" in n}
    curves = {"hf_peft": _curve(lambda x: peft_model(input_ids=x, labels=x).loss, peft_model, data, steps, device)}
    del peft_model, model
    peft_bf16 = hf_peft(build_base(args, device)[0], args, adapter_fp32=False)
    _load_init(peft_bf16, {f"base_model.model.{k[:-len('.lora_A')]}.lora_A.default.weight": v
                           for k, v in init_a.items()})
    curves["hf_peft_bf16_adapters"] = _curve(lambda x: peft_bf16(input_ids=x, labels=x).loss, peft_bf16, data,
                                             steps, device)
    del peft_bf16
    ours = peftcli_lora(build_base(args, device)[0], args, fused=True)
    _load_init(ours, init_a)
    curves["peftcli"] = _curve(peftcli_loss_fn(ours, args, compiled=False), ours, data, steps, device)
    ref = curves["hf_peft"]
    out = {"variant": "curve", "steps": steps, "batch": batch, "seq": seq, **{f"{k}_loss": v for k, v in curves.items()}}
    for key in ("peftcli", "hf_peft_bf16_adapters"):
        diff = [abs(a - b) for a, b in zip(ref, curves[key])]
        out[f"{key}_max_abs_diff"] = round(max(diff), 5)
        out[f"{key}_max_rel_diff"] = round(max(d / abs(a) for d, a in zip(diff, ref)), 5)
    return out


def _load_init(model, tensors):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in tensors:
                p.copy_(tensors[n])


def _curve(loss_fn, model, data, steps, device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0,
                            fused=device == "cuda")
    losses = []
    for step in range(steps):
        loss = loss_fn(data[step % len(data)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 5))
    return losses


def run_one(args):
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for HF peft's fp32 adapter matmuls, as the baseline
    try:
        return run_curve(args, device) if args.variant == "curve" else run_throughput(args.variant, args, device)
    except torch.OutOfMemoryError as e:
        return {"variant": args.variant, "error": "OOM", "detail": str(e)[:200]}


def ratios(results):
    by = {r["variant"]: r for r in results if "tokens_per_s" in r}
    out = {"variant": "ratios"}
    for method in ("dora", "ia3", "prefix"):
        ours, ref = by.get(f"peftcli-{method}"), by.get(f"hf-peft-{method}")
        if ours and ref:
            out[f"peftcli-{method}/hf-peft-{method} tokens_per_s"] = round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)
            out[f"peftcli-{method}/hf-peft-{method} peak_mem"] = round(
                ours["peak_mem_alloc_gib"] / ref["peak_mem_alloc_gib"], 3) if ours["peak_mem_alloc_gib"] else None
    for ours in [v for v in VARIANTS if v.startswith("peftcli")]:
        for ref in ("hf-peft-lora", "full"):
            if ours in by and ref in by:
                out[f"{ours}/{ref} tokens_per_s"] = round(by[ours]["tokens_per_s"] / by[ref]["tokens_per_s"], 3)
                a, b = by[ours]["peak_mem_alloc_gib"], by[ref]["peak_mem_alloc_gib"]
                if a and b:
                    out[f"{ours}/{ref} peak_mem"] = round(a / b, 3)
    return out


def main(argv=None):
    args = parse(argv)
    if args.variants == "methods":
        args.variants = ",".join(METHOD_VARIANTS)
    if args.variant:
        print(json.dumps(run_one(args)), flush=True)
        return
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for name in args.variants.split(","):
        r = subprocess.run([sys.executable, __file__, *base, "--variant", name], capture_output=True, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {
            "variant": name, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
        results.append(result)
        _emit(result, args.out)
    _emit(ratios(results), args.out)
    if any("error" in r for r in results):
        sys.exit(1)


def _emit(record, path):
    line = json.dumps(record)
    print(line, flush=True)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
