"""Attention for packed rows without a mask tensor: `model.attn_implementation: varlen`.

A packed row holds several examples end to end (tasks.PackedCausalLMCollator). transformers' SDPA path keeps them
apart with a dense block-diagonal mask, which costs O(row_length^2) work and memory however short the examples
are, and sends the call to a masked kernel. Here the collator hands the example boundaries to every attention
layer as `cu_seq_lens_q/k` and `max_length_q/k` (the names transformers' flash-attention path uses), and
attention runs per example:
- CUDA, bf16/fp16: PyTorch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`), causal;
- anywhere else (CPU, fp32, older torch): SDPA with the block-diagonal mask built from the boundaries.
Batches without boundaries (padded evaluation, generation) take transformers' own SDPA path with its mask.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "peftcli_varlen"  # the key registered with transformers' AttentionInterface
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def register() -> str:
    """Register the attention function (once) and return the name to pass as attn_implementation.

    Its mask function is flash attention's: no mask for packed or unpadded rows (the boundaries, or plain
    causality, replace it), the 2D padding mask otherwise, which `_padding_mask` turns into SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention signature: query/key/value [batch, heads, seq, dim] -> ([batch, seq, heads, dim], None)."""
    cu_seq = kwargs.get("cu_seq_lens_q")
    if cu_seq is None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError("varlen attention expects one packed row without a key/value prefix "
                         f"(got query {tuple(query.shape)}, key {tuple(key.shape)})")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    dtype = _compute_dtype(q)
    if module.training and dropout > 0:  # the varlen kernel has no attention dropout
        out = _masked(q, k, v, cu_seq, dropout, scaling)
    elif q.is_cuda and dtype in (torch.bfloat16, torch.float16) and _varlen_fn() is not None:
        out = _flash(*(t.to(dtype) for t in (q, k, v)), cu_seq, int(kwargs["max_length_q"]), scaling)
    else:
        out = _masked(q, k, v, cu_seq, 0.0, scaling)
    return out.unsqueeze(0), None


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """Under autocast, attention runs in the autocast dtype (as SDPA would): an fp32 model's rotary embedding
    hands over fp32 queries and keys even when the projections ran in bf16."""
    device = q.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype


@functools.cache
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


@functools.cache
def _varlen_options() -> tuple[dict, bool]:
    """Causal masking is `window_size=(-1, 0)` from torch 2.11 on, `is_causal=True` in 2.10."""
    params = inspect.signature(_varlen_fn()).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


def _flash(q, k, v, cu_seq, max_len: int, scaling):
    causal, native_gqa = _varlen_options()
    if k.shape[1] != q.shape[1]:
        if native_gqa:
            causal = {**causal, "enable_gqa": True}
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    cu_seq = cu_seq.to(torch.int32)
    return _varlen_fn()(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq, cu_seq, max_len, max_len,
                        scale=scaling, **causal)


def _masked(q, k, v, cu_seq, dropout: float, scaling):
    """The reference path: one SDPA call over the row with a causal block-diagonal mask from the boundaries."""
    lengths = torch.diff(cu_seq.to(torch.long))
    example = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths.to(q.device))
    position = torch.arange(q.shape[0], device=q.device)
    mask = (example[:, None] == example[None, :]) & (position[:, None] >= position[None, :])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         dropout_p=dropout, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, _padding_mask(attention_mask, query, key),
                                  dropout=dropout, scaling=scaling, **kwargs)


def _padding_mask(attention_mask, query, key):
    """transformers passes this implementation the raw 2D padding mask (or None): make SDPA's 4D causal one."""
    if attention_mask is None or attention_mask.ndim == 4:
        return attention_mask
    q_len, kv_len = query.shape[2], key.shape[2]
    keep = attention_mask[:, -kv_len:].to(torch.bool)[:, None, None, :]
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    causal = rows >= torch.arange(kv_len, device=query.device)[None, :]
    return keep & causal
