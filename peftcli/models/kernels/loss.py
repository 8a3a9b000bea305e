"""Chunked causal-LM cross entropy that never materialises the full (tokens, vocab) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import triton
from .lora import mm_fp32

__all__ = ["chunked_causal_lm_loss"]


def _shifted_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Position t predicts labels[t + 1]; the last position predicts nothing (as HF's ForCausalLMLoss)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _chunk_log_probs(h: Tensor, w: Tensor, softcap: float | None, logits: Tensor | None = None
                     ) -> tuple[Tensor, Tensor | None]:
    """fp32 log-softmax of one chunk's logits, plus the soft-cap derivative when capping.

    The matmul runs in the hidden dtype (as HF's lm_head, so values match it bit for bit);
    one fp32 log-softmax then replaces a separate logsumexp (max, subtract, exp, sum passes):
    the softmax part is memory-bound, so passes over (chunk, vocab) are what cost time.
    With a soft cap (Gemma 2: ``cap * tanh(z / cap)``) the derivative ``1 - tanh^2`` is
    returned too.
    """
    logits = h @ w.t() if logits is None else logits
    if softcap is None:
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32), None
    z = torch.tanh(logits.float().div_(softcap))
    log_probs = torch.log_softmax(z * softcap, dim=-1)
    return log_probs, z.square_().neg_().add_(1.0)


def _chunk_loss_sum(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Sum over the chunk of -log p(target)."""
    return -log_probs.gather(1, targets[:, None]).sum()


def _grad_logits(log_probs: Tensor, cap_grad: Tensor | None, targets: Tensor, scale: Tensor, dtype) -> Tensor:
    """scale * (softmax - onehot) [* soft-cap derivative] in ``dtype``; consumes ``log_probs``.

    The one-hot is subtracted in fp32: for a confident prediction p_target ~ 1 and the
    difference would vanish if p were rounded to bf16 first. The final scale-and-cast is
    one kernel writing the compute dtype directly.
    """
    p = log_probs.exp_()
    p.scatter_add_(1, targets[:, None], p.new_full((p.shape[0], 1), -1.0))
    if cap_grad is not None:
        p.mul_(cap_grad)
    return torch.mul(p, scale, out=torch.empty(p.shape, dtype=dtype, device=p.device))


def _fused_applies(logits: Tensor, softcap: float | None) -> bool:
    return triton is not None and logits.is_cuda and softcap is None and logits.stride(-1) == 1


def fused_loss_and_grad(logits: Tensor, targets: Tensor, scale: Tensor | None) -> Tensor:
    """One kernel per chunk instead of log-softmax, gather, exp, scatter and scale: returns each row's
    -log p(target) (fp32) and, with `scale`, overwrites `logits` with scale * (softmax - onehot) in its own dtype
    (the one-hot subtracted in fp32, as `_grad_logits`). Two passes over each row's logits: an online
    max/sum-exp, then the gradient."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    scale_t = (scale if scale is not None else torch.ones((), device=logits.device)).float().reshape(1)
    _ce_kernel[(rows,)](logits, logits.stride(0), targets, loss, scale_t, VOCAB=vocab,  # one compile per vocabulary
                        BLOCK=min(4096, triton.next_power_of_2(vocab)), WRITE_GRAD=scale is not None)
    return loss


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _ce_kernel(LOGITS, row_stride, TARGETS, LOSS, SCALE, VOCAB: tl.constexpr, BLOCK: tl.constexpr,
                   WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        at = LOGITS + row * row_stride
        target = tl.load(TARGETS + row).to(tl.int64)
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, VOCAB, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(at + cols, mask=cols < VOCAB, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        tl.store(LOSS + row, lse - tl.load(at + target).to(tl.float32))
        if WRITE_GRAD:
            scale = tl.load(SCALE)
            for start in range(0, VOCAB, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < VOCAB
                p = tl.exp(tl.load(at + cols, mask=mask, other=0.0).to(tl.float32) - lse)
                p = tl.where(cols == target, p - 1.0, p)
                tl.store(at + cols, (p * scale).to(LOGITS.dtype.element_ty), mask=mask)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean token cross entropy over ``hidden[index]``, one chunk of tokens at a time.

    Only one chunk of logits ever exists. Two ways to get the gradient:
    * ``grad_in_forward`` (default): each chunk's d(loss)/d(logits) is formed while its
      log-probs are at hand and pushed straight through the lm_head GEMMs, so backward only
      rescales by the incoming gradient (the loss is linear in it). Saves the logits GEMM
      and softmax pass that recomputing needs; keeps grad_hidden (as big as the hidden
      states it replaces) from forward to backward.
    * recompute: forward keeps only the hidden states; backward recomputes each chunk's
      logits. Nothing is computed for a backward that never comes.
    """

    @staticmethod
    def forward(ctx, hidden2d, weight, index, targets, inv_denom, chunk_tokens, softcap, grad_in_forward):
        need_h, need_w = ctx.needs_input_grad[:2]
        w = weight.to(hidden2d.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden2d.device)
        grads = _GradBuffers(hidden2d, w, need_h, need_w) if grad_in_forward else None
        for rows in _chunks(index.numel(), chunk_tokens):
            h = hidden2d.index_select(0, index[rows])
            logits = h @ w.t()
            if _fused_applies(logits, softcap):  # logits become d(loss)/d(logits) in place
                total += fused_loss_and_grad(logits, targets[rows], inv_denom if grads is not None else None).sum()
                if grads is not None:
                    grads.add(h, index[rows], logits)
                del logits
                continue
            log_probs, cap_grad = _chunk_log_probs(h, w, softcap, logits)
            total += _chunk_loss_sum(log_probs, targets[rows])
            if grads is not None:
                grads.add(h, index[rows], _grad_logits(log_probs, cap_grad, targets[rows], inv_denom, h.dtype))
            del logits, log_probs, cap_grad  # free this chunk's (chunk, vocab) buffers before the next one
        ctx.grad_in_forward = grad_in_forward
        if grad_in_forward:
            ctx.save_for_backward(*grads.result(weight.dtype))
        else:
            ctx.save_for_backward(hidden2d, w, index, targets, inv_denom)
            ctx.chunk_tokens, ctx.softcap, ctx.weight_dtype = chunk_tokens, softcap, weight.dtype
        return total * inv_denom

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grad_in_forward:
            grad_h, grad_w = ctx.saved_tensors
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
            return grad_h, grad_w, None, None, None, None, None, None
        hidden2d, w, index, targets, inv_denom = ctx.saved_tensors
        grads = _GradBuffers(hidden2d, w, *ctx.needs_input_grad[:2])
        scale = grad_loss * inv_denom
        for rows in _chunks(index.numel(), ctx.chunk_tokens):
            h = hidden2d.index_select(0, index[rows])
            logits = h @ w.t()
            if _fused_applies(logits, ctx.softcap):
                fused_loss_and_grad(logits, targets[rows], scale)
                grads.add(h, index[rows], logits)
                continue
            log_probs, cap_grad = _chunk_log_probs(h, w, ctx.softcap, logits)
            grads.add(h, index[rows], _grad_logits(log_probs, cap_grad, targets[rows], scale, h.dtype))
            del logits, log_probs, cap_grad
        grad_h, grad_w = grads.result(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def _chunks(n: int, size: int):
    """Row slices of at most ``size`` covering ``range(n)``; the last may be shorter."""
    return (slice(start, start + size) for start in range(0, n, size))


class _GradBuffers:
    """Accumulates grad_hidden (hidden dtype) and an fp32 grad_lm_head over chunks; skips what is not needed."""

    def __init__(self, hidden2d: Tensor, w: Tensor, need_h: bool, need_w: bool):
        self.w = w
        # Ignored tokens are never scattered into, so their gradient is exactly 0.
        self.grad_h = torch.zeros_like(hidden2d) if need_h else None
        self.grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None

    def add(self, h: Tensor, rows_index: Tensor, dlogits: Tensor) -> None:
        if self.grad_h is not None:
            self.grad_h.index_copy_(0, rows_index, dlogits @ self.w)
        if self.grad_w is not None:  # a tied / frozen lm_head (the LoRA default) skips this (V, H) GEMM
            self.grad_w += mm_fp32(dlogits.t(), h)

    def result(self, weight_dtype: torch.dtype):
        grad_w = None if self.grad_w is None else self.grad_w.to(weight_dtype)
        return self.grad_h, grad_w


def chunked_causal_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_tokens: int = 2048,
    num_items_in_batch: int | Tensor | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    grad_in_forward: bool = True,
) -> Tensor:
    """Shifted next-token cross entropy of ``hidden @ lm_head_weight.T`` against ``labels``.

    Equals HF transformers' ``ForCausalLMLoss`` (fp32 CE on shifted labels, sum divided by
    ``num_items_in_batch`` when given so gradient accumulation weights every token equally,
    else the mean over non-ignored tokens) but peaks at one chunk of logits. Ignored tokens
    are dropped before any matmul, so prompt/padding positions cost nothing. If no token is
    counted the loss is 0 (not NaN as in HF), so an all-masked batch cannot poison training.
    ``grad_in_forward`` picks how the gradient is made (see ``_ChunkedCrossEntropy``); it only
    applies when autograd will need one. Returns a 0-dim fp32 tensor.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    targets = _shifted_labels(labels, ignore_index).reshape(-1)
    index = (targets != ignore_index).nonzero().squeeze(1)  # one host sync per step
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    denom = index.numel() if num_items_in_batch is None else num_items_in_batch
    denom = torch.as_tensor(denom, dtype=torch.float32, device=hidden.device).clamp_min(1.0)
    # needs_input_grad ignores no_grad(), so decide here whether a backward can come at all.
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    return _ChunkedCrossEntropy.apply(
        hidden2d,
        lm_head_weight,
        index,
        targets.index_select(0, index),
        denom.reciprocal(),
        int(chunk_tokens),
        None if logit_softcap is None else float(logit_softcap),
        bool(grad_in_forward and wants_grad),
    )
