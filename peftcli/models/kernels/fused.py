"""Fused RMSNorm and SwiGLU with hand-written backward: Triton on CUDA, the same math in PyTorch elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rms_norm", "swiglu", "triton_available"]

try:  # Triton ships with torch's CUDA build only; CPU installs use the PyTorch path below.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available(t: Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _rms_fwd(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
        # Round the normalised row to the input dtype before the weight, exactly as HF's LlamaRMSNorm does.
        n = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd(DY, X, W, RSTD, DX, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = x * rstd
        dn = dy * w
        dx = (dn - n * (tl.sum(dn * n, 0) / N)) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_fwd(G, U, H, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        # silu rounded to the input dtype first, as HF's act_fn(gate) * up computes it.
        s = (g * tl.sigmoid(g)).to(H.dtype.element_ty).to(tl.float32)
        tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(DH, G, U, DG, DU, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        s = g * sig
        tl.store(DU + offs, (dh * s).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def _rms_forward_torch(x2d: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    xf = x2d.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return weight * (xf * rstd[:, None]).to(x2d.dtype), rstd


class _RMSNormFn(torch.autograd.Function):
    """y = w * (x / rms(x)); saves only x (compute dtype) and one fp32 rstd per row, no fp32 copy of x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        if triton_available(x2d):
            y = torch.empty_like(x2d)
            rstd = torch.empty(x2d.shape[0], dtype=torch.float32, device=x.device)
            n = x2d.shape[1]
            _rms_fwd[(x2d.shape[0],)](x2d, weight, y, rstd, n, eps, BLOCK=triton.next_power_of_2(n), num_warps=8)
        else:
            y, rstd = _rms_forward_torch(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if triton_available(x2d):
                dx = torch.empty_like(x2d)
                n = x2d.shape[1]
                _rms_bwd[(x2d.shape[0],)](dy2d, x2d, weight, rstd, dx, n, BLOCK=triton.next_power_of_2(n), num_warps=8)
            else:
                normed = x2d.float() * rstd[:, None]
                dn = dy2d.float() * weight.float()
                dx = ((dn - normed * (dn * normed).mean(-1, keepdim=True)) * rstd[:, None]).to(x2d.dtype)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # only when the norm itself is trained (full fine-tuning, LayerNorm tuning)
            normed = (x2d.float() * rstd[:, None]).to(x2d.dtype)
            dw = (dy2d.float() * normed.float()).sum(0).to(weight.dtype)
        return dx, dw, None


class _SwiGLUFn(torch.autograd.Function):
    """h = silu(g) * u; saves g and u only and recomputes silu in backward (HF also keeps silu(g))."""

    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        if triton_available(g):
            h = torch.empty_like(g)
            _swiglu_fwd[(triton.cdiv(g.numel(), 1024),)](g, u, h, g.numel(), BLOCK=1024)
        else:
            h = F.silu(g) * u
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        if triton_available(g):
            dg, du = torch.empty_like(g), torch.empty_like(u)
            _swiglu_bwd[(triton.cdiv(g.numel(), 1024),)](dh, g, u, dg, du, g.numel(), BLOCK=1024)
            return dg, du
        gf = g.float()
        sig = torch.sigmoid(gf)
        dhf = dh.float()
        du = (dhf * gf * sig).to(u.dtype)
        dg = (dhf * u.float() * sig * (1.0 + gf * (1.0 - sig))).to(g.dtype)
        return dg, du


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF Llama-style RMSNorm (``weight * normalise(x).to(x.dtype)``) with a lean backward."""
    return _RMSNormFn.apply(x, weight, float(eps))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` with a lean backward."""
    return _SwiGLUFn.apply(gate, up)
