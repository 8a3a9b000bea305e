"""Fused RMSNorm/SwiGLU (PyTorch path on CPU, Triton on CUDA) against the HF modules they replace."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peftcli.models.kernels.fused import rms_norm, swiglu, triton_available
from peftcli.models.speedups import FusedRMSNorm, FusedSwiGLUMLP, use_fused_kernels
from peftcli.methods.install import prepare_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf(device, dtype):
    hf = LlamaRMSNorm(48, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.add_(torch.randn(48).to(hf.weight))
    x = torch.randn(3, 5, 48, device=device, dtype=dtype, requires_grad=True)
    ours, ref = rms_norm(x, hf.weight, 1e-5), hf(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours, ref, **tol)
    for a, b in zip(_grads(ours, (x, hf.weight)), _grads(ref, (x, hf.weight))):
        torch.testing.assert_close(a, b, **(tol if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(device, dtype):
    g = torch.randn(4, 7, 33, device=device, dtype=dtype, requires_grad=True)  # odd size: masked tail
    u = torch.randn(4, 7, 33, device=device, dtype=dtype, requires_grad=True)
    ours, ref = swiglu(g, u), torch.nn.functional.silu(g) * u
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours, ref, **tol)
    for a, b in zip(_grads(ours, (g, u)), _grads(ref, (g, u))):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels need CUDA")
def test_triton_path_taken_and_bitwise_forward_on_cuda():
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    assert triton_available(x)
    hf = LlamaRMSNorm(2048, eps=1e-5).to("cuda", torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, hf.weight, 1e-5), hf(x), rtol=0, atol=1e-2)


def test_swap_keeps_names_and_outputs(tiny_llama):
    from transformers import AutoModelForCausalLM

    from peftcli.methods.lora import LoraConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.randint(8, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama), "lora",
                               LoraConfig(target_modules="all-linear"))
    keys = set(model.state_dict())
    want = model(input_ids=ids, labels=ids)
    want.loss.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    swapped = use_fused_kernels(model)
    assert swapped == 2 * 2 + 1 + 2  # two norms and one MLP per layer, the final norm
    assert sum(isinstance(m, (FusedRMSNorm, FusedSwiGLUMLP)) for m in model.modules()) == swapped
    assert set(model.state_dict()) == keys and set(base.state_dict()) <= keys
    got = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    got.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6)


def test_recipe_option_fused_kernels_trains_and_reloads(tiny_llama, tiny_bert, tmp_path):
    """`model.fused_kernels: true` swaps the modules for the run and for reloading it; a model with nothing
    to fuse is a one-line recipe error."""
    import yaml

    import json

    from peftcli.runs.folder import load_trained
    from runhelp import run_cli

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"say {w}", "input": "", "output": w}
                                  for w in ("yes", "no", "maybe", "later")] * 2), encoding="utf-8")

    def recipe(model, task, data):
        path = tmp_path / f"{task}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(model), "task": task, "fused_kernels": True},
            "data": data, "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
            "train": {"output_dir": str(tmp_path / task), "max_steps": 2, "per_device_train_batch_size": 2,
                      "use_cpu": True, "disable_tqdm": True}}), encoding="utf-8")
        return path

    lm = recipe(tiny_llama, "causal-lm", {"train": str(alpaca), "lm_format": "alpaca", "max_length": 32})
    assert run_cli("train", str(lm)).exit_code == 0
    model = load_trained(tmp_path / "causal-lm")[2]
    assert any(isinstance(m, FusedSwiGLUMLP) for m in model.modules())
    from tiny import REVIEWS

    bert = recipe(tiny_bert, "sequence-classification", {"train": str(REVIEWS / "train.jsonl"), "limit": {"train": 8}})
    result = run_cli("train", str(bert))
    assert result.exit_code == 2 and "model.fused_kernels" in result.output, result.output
    assert not (tmp_path / "sequence-classification").exists()


def test_fused_kernels_unset_means_wherever_they_can_run(tiny_llama, tiny_bert, monkeypatch):
    """Left unset, the kernels go in where CUDA and Triton are (faked here), and a model with nothing to fuse keeps
    its own modules without an error; `false` keeps them out even then; on a CPU-only machine nothing changes."""
    from peftcli.models import loading as models
    from peftcli.config.sections import ModelSection

    def load(path, task, **options):
        return models.load_model(ModelSection(name_or_path=str(path), task=task, **options), num_labels=2)

    def fused(model):
        return any(isinstance(m, (FusedSwiGLUMLP, FusedRMSNorm)) for m in model.modules())

    if not models.fused_kernels_available():
        assert not fused(load(tiny_llama, "causal-lm"))
    monkeypatch.setattr(models, "fused_kernels_available", lambda: True)
    assert fused(load(tiny_llama, "causal-lm"))
    assert not fused(load(tiny_llama, "causal-lm", fused_kernels=False))
    assert not fused(load(tiny_bert, "sequence-classification"))
