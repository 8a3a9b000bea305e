#!/usr/bin/env python3
"""DoRA vs LoRA cost on one layer, peftcli against HF peft: forward+backward time and peak memory, one JSON line each.

One bf16 linear layer (Llama-3-8B's 4096x4096 q_proj shape), r=16, tokens x 4096 bf16 input, loss = sum of
squares; the adapter's fp32 master weights as each library keeps them. HF peft, when installed, is the reference.
Usage:
  python scripts/bench_dora.py                  # on a GPU
  python scripts/bench_dora.py --tiny --iters 2  # CPU smoke test
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def peftcli_layer(base: nn.Linear, r: int, dora: bool) -> nn.Module:
    from peftcli.methods.lora_layers import LoraLinear

    layer = LoraLinear(base, r, scale=2.0, dropout=0.0)
    nn.init.normal_(layer.lora_B, std=0.01)
    if dora:
        layer.enable_dora()
    return layer


def hf_peft_layer(base: nn.Linear, r: int, dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    holder = nn.Sequential(base)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=dora))
    return model.base_model.model[0]


def measure(layer: nn.Module, x: torch.Tensor, iters: int) -> dict:
    def step():
        out = layer(x)
        out.float().square().sum().backward()

    for _ in range(3):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    result = {"ms_per_step": 1000 * (time.perf_counter() - start) / iters}
    if x.is_cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke test")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dim, tokens, r = (64, 32, 4) if args.tiny else (4096, args.tokens, 16)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for library, build in (("peftcli", peftcli_layer), ("hf-peft", hf_peft_layer)):
        for dora in (False, True):
            torch.manual_seed(0)
            base = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype).requires_grad_(False)
            try:
                layer = build(base, r, dora)
            except ImportError:
                continue
            x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
            row = {"library": library, "method": "dora" if dora else "lora", "dim": dim, "tokens": tokens, "r": r,
                   **measure(layer, x, args.iters)}
            print(json.dumps(row), flush=True)
            del layer, base, x
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
