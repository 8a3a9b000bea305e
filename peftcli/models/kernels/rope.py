"""Rotary position embedding of q and k in one pass, forward and backward: Triton on CUDA, PyTorch elsewhere.

transformers' `apply_rotary_pos_emb` is `q * cos + rotate_half(q) * sin` (and the same for k): a slice, a negation,
a concatenation, two multiplications and an addition, each reading and writing a whole (batch, heads, tokens, dim)
tensor, forward and backward. Here one kernel reads q, k, cos and sin once and writes the rotated q and k; the
backward is the inverse rotation of the incoming gradients. Per head-dim pair (x1, x2) = (first, second half):

    forward:  y1 = x1 * cos1 - x2 * sin1        y2 = x2 * cos2 + x1 * sin2
    backward: dx1 = dy1 * cos1 + dy2 * sin2     dx2 = dy2 * cos2 - dy1 * sin1

The math runs in fp32 and is rounded once to the output dtype (transformers rounds after each operation, so
bf16 results differ by rounding only). The output dtype is transformers' (`q * cos` type promotion).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .fused import triton

__all__ = ["fused_rotary"]


def fused_rotary(original):
    """Wrap a transformers `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` ([batch, heads, tokens, dim]
    inputs, [batch or 1, tokens, dim] cos/sin): the kernel where it applies, `original` everywhere else."""
    if getattr(original, "peft_fused", False):
        return original

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
        if _kernel_applies(q, k, cos, sin, unsqueeze_dim):
            return _Rotary.apply(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.peft_fused = True
    return apply_rotary_pos_emb


def _kernel_applies(q, k, cos, sin, unsqueeze_dim) -> bool:
    return (triton is not None and q.is_cuda and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4
            and cos.dim() == 3 and cos.shape == sin.shape and q.shape[-1] == cos.shape[-1] == k.shape[-1]
            and q.shape[-1] % 2 == 0 and not (cos.requires_grad or sin.requires_grad)
            and q.shape[0] == k.shape[0] and cos.shape[0] in (1, q.shape[0]) and q.shape[2] == cos.shape[1]
            and all(t.stride(-1) == 1 for t in (q, k, cos, sin)))


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_out = torch.empty_like(q, dtype=torch.result_type(q, cos))
        k_out = torch.empty_like(k, dtype=torch.result_type(k, cos))
        rotate(q, k, cos, sin, q_out, k_out, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.inputs = [(t.shape, t.dtype) for t in (q, k)]
        ctx.outputs = [t.dtype for t in (q_out, k_out)]
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = []
        for grad, (shape, _), out_dtype in zip((grad_q, grad_k), ctx.inputs, ctx.outputs):
            if grad is None:  # that output was not used
                grad = torch.zeros(shape, dtype=out_dtype, device=cos.device)
            grads.append(grad if grad.stride(-1) == 1 else grad.contiguous())
        dq, dk = (torch.empty(shape, dtype=dtype, device=cos.device) for shape, dtype in ctx.inputs)
        rotate(grads[0], grads[1], cos, sin, dq, dk, backward=True)
        return dq, dk, None, None


def rotate(q, k, cos, sin, q_out, k_out, backward: bool) -> None:
    """Launch one program per (batch, token): it rotates every q head and every k head of that token."""
    batch, q_heads, tokens, dim = q.shape
    half = dim // 2
    cos_batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(batch * tokens,)](
        q, k, cos, sin, q_out, k_out, tokens, q_heads, k.shape[1],
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        cos_batch_stride, cos.stride(1), sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
        HALF=half, BLOCK=triton.next_power_of_2(half), Q_HEADS=triton.next_power_of_2(q_heads),
        K_HEADS=triton.next_power_of_2(k.shape[1]), BACKWARD=backward)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rotate_heads(X, Y, sx_h, sy_h, heads, c1, c2, s1, s2, cols, HALF: tl.constexpr, HEADS: tl.constexpr,
                      BACKWARD: tl.constexpr):
        """All heads of one token as a (HEADS, BLOCK) tile."""
        h = tl.arange(0, HEADS)[:, None]
        mask = (h < heads) & (cols[None, :] < HALF)
        x_at, y_at = X + h * sx_h + cols[None, :], Y + h * sy_h + cols[None, :]
        x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1[None, :] + x2 * s2[None, :]
            y2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            y1 = x1 * c1[None, :] - x2 * s1[None, :]
            y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(y_at, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_at + HALF, y2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, COS, SIN, QO, KO, tokens, q_heads, k_heads,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
                     sc_b, sc_t, ss_b, ss_t, HALF: tl.constexpr, BLOCK: tl.constexpr, Q_HEADS: tl.constexpr,
                     K_HEADS: tl.constexpr, BACKWARD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b, t = row // tokens, row % tokens
        cols = tl.arange(0, BLOCK)
        mask = cols < HALF
        cos = COS + b * sc_b + t * sc_t
        sin = SIN + b * ss_b + t * ss_t
        c1 = tl.load(cos + cols, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin + cols, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        _rotate_heads(Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, sq_h, sqo_h, q_heads,
                      c1, c2, s1, s2, cols, HALF, Q_HEADS, BACKWARD)
        _rotate_heads(K + b * sk_b + t * sk_t, KO + b * sko_b + t * sko_t, sk_h, sko_h, k_heads,
                      c1, c2, s1, s2, cols, HALF, K_HEADS, BACKWARD)
