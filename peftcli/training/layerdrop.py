"""LayerDrop (Fan et al. 2019): skip whole transformer layers at random while training; prune layers for inference."""
from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import UserError
from ..methods.registry import layer_index

_STACK_NAMES = ("layer", "layers", "h", "block", "blocks")


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of blocks (`encoder.layer`, `model.layers`, `transformer.h`...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in _STACK_NAMES and len(module):
            if all(layer_index(f"{name}.{i}.x") == i for i in range(len(module))):
                return module
    raise UserError("layerdrop: this model has no list of transformer layers (encoder.layer / model.layers / h)")


class LayerDrop:
    """Per-layer skip probabilities, read by the wrapped forwards. Draws no random numbers at rate 0, so a rate
    of 0 is exactly the base model (same outputs, same random stream)."""

    def __init__(self, model: nn.Module, cfg):
        self.cfg, self.layers = cfg, layer_stack(model)
        self.rate = cfg.rate if cfg.schedule == "constant" else 0.0
        for index, layer in enumerate(self.layers):
            layer.forward = self._wrap(layer, layer.forward, index)

    def layer_rate(self, index: int) -> float:
        if self.cfg.depth_scaling == "linear":
            return self.rate * (index + 1) / len(self.layers)
        return self.rate

    def _wrap(self, layer: nn.Module, forward, index: int):
        def maybe_skip(*args, **kwargs):
            rate = self.layer_rate(index) if layer.training else 0.0
            if rate > 0 and torch.rand(()) < rate:
                hidden = args[0] if args else kwargs["hidden_states"]
                # LayerDrop at training time is identity on the residual stream (Fan et al. 2019, Sec. 3.1).
                return hidden
            return forward(*args, **kwargs)

        return maybe_skip


class LayerDropCallback(TrainerCallback):
    """Sets the rate each step: constant, or a linear ramp from 0 to `rate` over training."""

    def __init__(self, model: nn.Module, cfg):
        self.drop = LayerDrop(model, cfg)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.drop.cfg.schedule == "linear":
            self.drop.rate = self.drop.cfg.rate * state.global_step / max(1, state.max_steps)


def pruned_indices(cfg, total: int) -> list[int]:
    if cfg.prune_layers == "every_other":
        return list(range(1, total, 2))  # "every other" pruning keeps even layers (Fan et al. 2019, Sec. 4)
    bad = [i for i in cfg.prune_layers if not 0 <= i < total]
    if bad:
        raise UserError(f"layerdrop.prune_layers: {bad} out of range; the model has layers 0..{total - 1}")
    return sorted(set(cfg.prune_layers))


def prune_layers(model: nn.Module, cfg) -> nn.Module:
    """Remove layers for inference; the config and per-layer indices follow, so the saved model reloads as a
    plain HF model with fewer layers."""
    if not cfg or not cfg.prune_layers:
        return model
    stack = layer_stack(model)
    drop = set(pruned_indices(cfg, len(stack)))
    if len(drop) >= len(stack):
        raise UserError("layerdrop.prune_layers would remove every layer; keep at least one")
    kept = [layer for i, layer in enumerate(stack) if i not in drop]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # KV-cache slots follow the new numbering
    for index in sorted(drop, reverse=True):
        del stack[index]  # ModuleList renumbers the rest: state_dict keys match a base model with fewer layers
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
    config.num_hidden_layers = len(kept)
    return model
