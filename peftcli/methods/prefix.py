"""Reusable key/value prefix injection: a per-layer prefix handed to every attention layer as a pre-filled cache."""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import UserError
from .signatures import require_cache_in_attention


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's self-attention, from its text config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def is_causal(model: nn.Module) -> bool:
    """Whether the model's self-attention is causal (decoders), read from its attention modules."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


class PrefixLayer(DynamicLayer):
    """A cache layer that prepends a fixed prefix and stores nothing: recomputing a layer under gradient
    checkpointing sees the same prefix, and gradients reach the prefix's parameters."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.used = False  # set by the attention layer that reads it; checked after every forward

    def update(self, key_states, value_states, *args, **kwargs):
        self.used = True
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prefix_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], growing: bool) -> DynamicCache:
    """A cache holding one (keys, values) prefix per layer, each [batch, kv_heads, P, head_dim].
    growing=False: training/scoring (nothing is stored); growing=True: generation (new tokens are appended)."""
    cache = DynamicCache()
    if growing:
        for keys, values in pairs:
            layer = DynamicLayer()
            layer.update(keys, values)
            cache.layers.append(layer)
    else:
        cache.layers = [PrefixLayer(keys, values) for keys, values in pairs]
    return cache


class PrefixSource(nn.Module):
    """What a prefix method provides: `num_tokens` and `states(batch) -> [(keys, values)] per layer`."""

    num_tokens: int

    def states(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def split_states(flat: torch.Tensor, batch: int, kv_heads: int, head_dim: int):
    """[layers, 2, P, kv_heads * head_dim] -> per layer (keys, values), each [batch, kv_heads, P, head_dim]."""
    layers, _, tokens, _ = flat.shape
    shaped = flat.view(layers, 2, tokens, kv_heads, head_dim).permute(0, 1, 3, 2, 4)
    return [(shaped[i, 0].unsqueeze(0).expand(batch, -1, -1, -1),
             shaped[i, 1].unsqueeze(0).expand(batch, -1, -1, -1)) for i in range(layers)]


def main_input(args: tuple, kwargs: dict) -> tuple[dict, torch.Tensor]:
    """Forward kwargs with a positional input_ids folded in, and the tensor giving batch and length."""
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    source = kwargs.get("input_ids")
    return kwargs, source if source is not None else kwargs["inputs_embeds"]


class _Paused:
    """A flag set while our own generate runs, so the forward hook does not insert the prompt twice."""

    def __init__(self):
        self.on = False

    @contextlib.contextmanager
    def __call__(self):
        self.on, before = True, self.on
        try:
            yield
        finally:
            self.on = before


def install_prefix(model: nn.Module, source: PrefixSource, attr: str, method: str) -> nn.Module:
    """Register `source` as `model.<attr>` (so its parameters are saved, restored and checkpointed with the model)
    and give every forward and `model.generate` its prefix. Reused by other prefix-based methods."""
    cache_name = require_cache_in_attention(model, method)
    model.add_module(attr, source)
    paused = _Paused()
    causal = is_causal(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def hook(module, args, kwargs):
        past = cached(kwargs)
        if paused.on or (past is not None and past.get_seq_length() > 0):
            return None  # a continuation step: the prefix is already in the cache
        kwargs, main = main_input(args, kwargs)
        batch, length = main.shape[:2]
        pairs = [(k.to(module.dtype), v.to(module.dtype)) for k, v in source.states(batch)]
        kwargs.pop("past_key_values", None)
        kwargs[cache_name] = prefix_cache(pairs, growing=False)
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), batch, length, source.num_tokens,
                                               main.device)
        if not causal and takes_positions and kwargs.get("position_ids") is None:
            # Encoders read positions 0..L-1 as in pretraining; the prefix only adds keys and values.
            kwargs["position_ids"] = torch.arange(length, device=main.device).unsqueeze(0).expand(batch, -1)
        return (), kwargs

    def check_used(module, args, kwargs, output):
        cache = kwargs.get(cache_name)
        unused = [i for i, layer in enumerate(getattr(cache, "layers", ())) if isinstance(layer, PrefixLayer)
                  and not layer.used]
        if unused:
            raise UserError(f"method.name: {method}'s prefix never reached the attention of layers {unused} of "
                            f"{type(module).__name__}; this transformers version passes the cache differently: "
                            f"install the tested versions (pip install -c constraints.txt -e .)")
        return output

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model.register_forward_hook(check_used, with_kwargs=True)
    allow_checkpointing_with_prefix(model)
    if causal and hasattr(model, "generate"):
        model.generate = _prefix_generate(model, source, paused, cache_name)
    return model


def cached(kwargs: dict):
    """The cache a forward was given, under either of its names."""
    past = kwargs.get("cache")
    return past if past is not None else kwargs.get("past_key_values")


def extend_mask(mask, batch: int, length: int, prefix: int, device) -> torch.Tensor:
    """A 2D mask covering prefix + input: the prefix is always visible."""
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    return torch.cat([mask.new_ones(batch, prefix), mask], dim=1)


def allow_checkpointing_with_prefix(model: nn.Module) -> None:
    """transformers drops `past_key_values` inside checkpointed layers (peft#869): our prefix cache stores nothing,
    so recomputation is safe and the layers may keep it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


def _prefix_generate(model: nn.Module, source: PrefixSource, paused: _Paused, cache_name: str):
    """`model.generate` with the prefix in a pre-filled cache. transformers treats a filled cache as covering the
    first tokens of input_ids, so P placeholder ids stand for the prefix and are cut from the result."""
    base_generate = type(model).generate

    def generate(input_ids=None, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        tokens = source.num_tokens
        with torch.no_grad():
            pairs = [(k.to(model.dtype), v.to(model.dtype)) for k, v in source.states(batch)]
        kwargs[cache_name] = prefix_cache(pairs, growing=True)
        ids = torch.cat([input_ids.new_zeros(batch, tokens), input_ids], dim=1)
        mask = extend_mask(attention_mask, batch, length, tokens, input_ids.device)
        with paused():
            out = base_generate(model, input_ids=ids, attention_mask=mask, **kwargs)
        return strip_columns(out, tokens)

    return generate


def strip_columns(out, count: int):
    """Drop the first `count` columns of generate's sequences (tensor or GenerateOutput)."""
    if isinstance(out, torch.Tensor):
        return out[:, count:]
    out.sequences = out.sequences[:, count:]
    return out
