"""The one-pass rotary kernel (kernels/rope.py) against transformers' apply_rotary_pos_emb, forward and backward.

The kernel tests need Triton: they run on CUDA, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1 python -m pytest tests/test_rope_kernel.py` with triton installed)."""
from __future__ import annotations

import os

import pytest
import torch
from transformers.models.llama import modeling_llama

from peftcli.models.kernels import rope
from peftcli.models.kernels.fused import triton
from peftcli.models.speedups import use_fused_kernels

ORIGINAL = modeling_llama.apply_rotary_pos_emb
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(triton is None or (DEVICE == "cpu" and not os.environ.get("TRITON_INTERPRET")),
                                  reason="Triton on CUDA, or its CPU interpreter (TRITON_INTERPRET=1)")


def _inputs(batch, tokens, q_heads, k_heads, dim, dtype, cos_batch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, tokens, q_heads, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)  # HF's layout
    k = torch.randn(batch, tokens, k_heads, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    angle = torch.randn(cos_batch, tokens, dim // 2, generator=g)
    emb = torch.cat([angle, angle], -1).to(DEVICE)
    return q.requires_grad_(), k.requires_grad_(), emb.cos(), emb.sin()


@needs_kernel
@pytest.mark.parametrize("dtype,cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(2, 5, 4, 2, 8, 2), (3, 7, 9, 3, 64, 1)])  # SmolLM2's 9/3 heads, shared cos
def test_kernel_matches_transformers(dtype, cos_dtype, shape):
    q, k, cos, sin = _inputs(*shape[:5], dtype, shape[5])
    cos, sin = cos.to(cos_dtype), sin.to(cos_dtype)
    want = ORIGINAL(q, k, cos, sin)
    got = rope._Rotary.apply(q, k, cos, sin)
    grads = tuple(torch.randn_like(t) for t in want)
    for a, b in zip(got + torch.autograd.grad(got, (q, k), grads), want + torch.autograd.grad(want, (q, k), grads)):
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = 1e-5 if a.dtype == torch.float32 else 2e-2  # bf16: transformers rounds after each operation
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fused_kernels_swap_the_rotary_and_keep_cpu_results(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(5, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        use_fused_kernels(model)
        after = model(input_ids=ids).logits
    assert getattr(modeling_llama.apply_rotary_pos_emb, "peft_fused", False)
    assert rope.fused_rotary(modeling_llama.apply_rotary_pos_emb) is modeling_llama.apply_rotary_pos_emb  # once
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
