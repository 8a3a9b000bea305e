"""Memory-lean LoRA linear layer: frozen base matmul plus low-rank adapter, with a hand-written backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lora_linear", "lora_delta_weight", "mm_fp32"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Return ``a @ b`` with at least fp32 precision in accumulation and output.

    Weight gradients reduce over every token of the batch (K = batch * seq_len), and a LoRA
    update is small relative to the weights it adapts, so rounding that reduction to bf16
    would throw the update away. On CUDA the bf16 GEMM writes fp32 directly
    (``aten::mm.dtype``), so no fp32 copy of an activation is ever made; elsewhere (CPU
    tests) the inputs are upcast, which is exact. fp32/fp64 inputs are left as they are.
    """
    if a.dtype not in _HALF_DTYPES:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _keep_mask(x2d: Tensor, dropout_p: float) -> Tensor:
    """Sample a bool keep-mask shaped like ``x2d``.

    Stored as bool (1 byte per element) instead of a dropped copy of x (2 bytes in bf16):
    x itself is usually alive anyway (q/k/v projections share one input).
    """
    return torch.empty_like(x2d, dtype=torch.bool).bernoulli_(1.0 - dropout_p)


class _LoRALinearFn(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T, saving only x, a bool mask and xa = dropout(x) A^T.

    The dropout rescale 1/(1-p) is folded into the scalar s_eff = s/(1-p), so the saved
    ``xa`` is the raw ``(x * mask) A^T`` and no extra rounding of it happens.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p):
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        x2d = x.reshape(-1, x.shape[-1])
        # Master A/B stay fp32 in the optimiser; the matmuls run in the activations' dtype.
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        w = weight.to(x.dtype)
        bias_c = None if bias is None else bias.to(x.dtype)

        mask = _keep_mask(x2d, dropout_p) if dropout_p > 0.0 else None
        x_in = x2d if mask is None else x2d * mask
        xa = x_in @ a.t()  # (N, r): the only new activation we keep
        eff = scale / (1.0 - dropout_p)

        out = F.linear(x2d, w, bias_c)
        out.addmm_(xa, b.t(), alpha=eff)  # fused: no (N, out) temporary for the adapter branch

        # Save only what the requested gradients read (frozen W: LoRA, Hu et al. 2021).
        ctx.save_for_backward(
            x2d if (need_a or need_w) else None,
            mask if (need_a or need_x) else None,
            xa if need_b else None,
            w if need_x else None,
            a if need_x else None,
            b if (need_x or need_a) else None,
        )
        ctx.eff = eff
        ctx.x_shape = x.shape
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, mask, xa, w, a, b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        w_dtype, bias_dtype, a_dtype, b_dtype = ctx.param_dtypes
        eff = ctx.eff
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None

        gb = g @ b if (need_x or need_a) else None  # (N, r), shared by grad_x and grad_A
        if need_x:
            grad_x = _lora_grad_input(g, w, a, gb, mask, eff).view(ctx.x_shape)
        if need_a:
            x_in = x2d if mask is None else x2d * mask
            grad_a = mm_fp32(gb.t(), x_in).mul_(eff).to(a_dtype)
        if need_b:
            grad_b = mm_fp32(g.t(), xa).mul_(eff).to(b_dtype)
        if need_w:  # only when the caller unfroze W; plain LoRA never gets here
            grad_w = mm_fp32(g.t(), x2d).to(w_dtype)
        if need_bias:
            grad_bias = g.sum(0, dtype=torch.float32).to(bias_dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def _lora_grad_input(g: Tensor, w: Tensor, a: Tensor, gb: Tensor, mask: Tensor | None, eff: float) -> Tensor:
    """dL/dx = g W + s_eff * ((g B) A) * mask, accumulated into one (N, in) buffer."""
    grad_x = g @ w
    if mask is None:
        return grad_x.addmm_(gb, a, alpha=eff)  # fused, no (N, in) temporary
    # Dropout only sits on the adapter branch, so only its part is masked.
    return grad_x.add_((gb @ a).mul_(mask), alpha=eff)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float,
    training: bool,
) -> Tensor:
    """``F.linear(x, W, bias) + scale * F.linear(F.linear(dropout(x), A), B)``, lean in memory.

    ``weight``/``bias`` are the frozen base layer (typically bf16); ``lora_a`` (r x in) and
    ``lora_b`` (out x r) are fp32 master parameters, cast to ``x.dtype`` for compute. Their
    gradients come back in their own dtype, reduced in fp32. Only x (no copy), a bool
    dropout mask and the (N, r) low-rank activation are saved for backward, unlike a
    composition of autograd ops that would also keep the dropped x and an fp32 copy of x.
    """
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Mixed precision (`train.bf16` over fp32 weights): compute in the autocast dtype, as nn.Linear would.
        # Autocast itself is switched off inside, since it would recast the function's matmuls one by one
        # and leave the fused adapter add with mixed dtypes.
        compute = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _LoRALinearFn.apply(x.to(compute), weight, bias, lora_a, lora_b, float(scale), p)
    return _LoRALinearFn.apply(x, weight, bias, lora_a, lora_b, float(scale), p)


def lora_delta_weight(lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``scale * B @ A`` in fp32, the update to add to W when merging the adapter.

    Computed in fp32 so merging into a bf16 W rounds once, at the final add.
    """
    return torch.mm(lora_b.float(), lora_a.float()).mul_(scale)
