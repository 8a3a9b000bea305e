"""Ladder Side-Tuning (Sung et al. 2022): a narrow side network fed by the frozen backbone through gated ladders."""
from __future__ import annotations

import dataclasses
import inspect
import logging

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field, positive
from . import bottleneck as bn
from . import lst_blocks as blocks
from .prefix import is_causal
from .registry import Method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LstConfig:
    # Sung et al. 2022, Sec. 3: the side network is 1/r as wide as the backbone (hidden and FFN sizes), r = 8.
    reduction_factor: int = field(8, check=positive, doc="side width = hidden / this (FFN size = intermediate / this)")
    # Sec. 3: ladder gate mu = sigmoid(alpha / T) with T = 0.1 and alpha initialised at 0.
    gate_temperature: float = field(0.1, check=positive, doc="T in the ladder gate sigmoid(alpha / T)")


class SideNetwork(nn.Module):
    """Ladders from the embeddings and every block output into a side network of pruned transformer blocks; its
    result is added (through a zero-initialised up-projection) to the backbone's detached last hidden state. The
    backbone runs with autograd off, so no gradient enters it and none of its activations are kept for backward:
    the memory saving of the method (Sec. 1)."""

    def __init__(self, dim: int, side_blocks: list[blocks.SideBlock], width: int, cfg: LstConfig, causal: bool):
        super().__init__()
        device = side_blocks[0].ffn_out.weight.device
        self.ladders = nn.ModuleList(nn.Linear(dim, width, device=device) for _ in range(len(side_blocks) + 1))
        self.blocks = nn.ModuleList(side_blocks)
        self.gate_logits = nn.Parameter(torch.zeros(len(side_blocks), device=device))
        self.up = nn.Linear(width, dim, device=device)
        nn.init.zeros_(self.up.weight)  # starts as the unchanged backbone
        nn.init.zeros_(self.up.bias)
        self.temperature, self.causal = cfg.gate_temperature, causal
        self.states: list[torch.Tensor] = []
        self.padding: torch.Tensor | None = None
        self.rope = None
        self.grad_mode = True

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits / self.temperature)

    def attention_mask(self, length: int, device) -> torch.Tensor | None:
        """Boolean [batch, 1, L, L]: padded keys hidden, and future keys for causal models. Every token sees itself,
        so rows of padding tokens are never empty (their outputs are unused)."""
        allowed = None
        if self.padding is not None:
            allowed = self.padding.to(device=device, dtype=torch.bool)[:, None, None, :length]
        if self.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            allowed = causal if allowed is None else allowed & causal
        if allowed is None:
            return None
        return allowed | torch.eye(length, dtype=torch.bool, device=device)

    def run(self, last: torch.Tensor) -> torch.Tensor:
        states, self.states = self.states, []
        mask = self.attention_mask(last.shape[1], last.device)
        rope = None if self.rope is None else tuple(t.float() for t in self.rope)
        gates = self.gates()
        side = self.ladders[0](states[0])
        for i, block in enumerate(self.blocks):
            side = block(gates[i] * self.ladders[i + 1](states[i + 1]) + (1 - gates[i]) * side, mask, rope)
        return last + self.up(side).to(last.dtype)

    def take_model_input(self, mask_position: int):
        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[mask_position] if len(args) > mask_position else None)
            self.padding = mask if mask is not None and mask.dim() == 2 else None
            self.grad_mode = torch.is_grad_enabled()
            torch.set_grad_enabled(False)  # the backbone runs without autograd; run() turns it back on
        return hook

    def restore_grad_mode(self, module, args, kwargs, output):
        torch.set_grad_enabled(self.grad_mode)  # also after an exception inside the backbone (always_call)
        self.states, self.padding, self.rope = [], None, None

    def take_input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.states = [hidden.detach().float()]
        self.rope = kwargs.get("position_embeddings")

    def take_output(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.states.append(hidden.detach().float())
        if len(self.states) < len(self.ladders):
            return None
        torch.set_grad_enabled(self.grad_mode)  # the side network and the task head train
        result = self.run(hidden.detach())
        return (result, *output[1:]) if isinstance(output, tuple) else result


def side_geometry(model: nn.Module, family: blocks.Family, width: int, ffn_size: int, r: int) -> blocks.Geometry:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return blocks.Geometry(heads, kv_heads, head_dim, blocks.side_heads(width, heads, head_dim, family.rotary),
                           max(1, ffn_size // r))


def kept_hidden_dims(model: nn.Module, sites: list[bn.Site], width: int) -> torch.Tensor:
    """One set of hidden dims for the whole side network, so its residual stream means the same in every block:
    the dims that the attention and FFN output projections write most strongly (L1 norm, Li et al. 2017)."""
    scores = sum(blocks.importance(model.get_submodule(name).weight)
                 for site in sites for name in (site.attn_out, site.ffn_out))
    return blocks.top(scores, width)


def check_rotary_signature(block: nn.Module) -> None:
    if "position_embeddings" not in inspect.signature(block.forward).parameters:
        raise UserError(f"method.name: lst reads the rotary (cos, sin) that {type(block).__name__} receives as "
                        "`position_embeddings`, but its forward takes no such argument; this transformers "
                        "version is not supported by lst, pick another method")


def keep_activations_off(model: nn.Module) -> None:
    """Gradient checkpointing would recompute the last block, and with it the side network's hooks, while the
    backbone keeps no activations to save in the first place: LST turns it into a no-op."""
    def skip(**kwargs):
        logger.info("lst: the backbone keeps no activations for backward; gradient checkpointing is not needed")
    model.gradient_checkpointing_enable = skip


def inject(model: nn.Module, cfg: LstConfig) -> nn.Module:
    sites = sorted(bn.find_sites(model), key=lambda s: s.layer)
    family = blocks.family_of(model.get_submodule(sites[0].block))
    if family.rotary:
        check_rotary_signature(model.get_submodule(sites[0].block))
    dim = bn.hidden_size(model, sites[0])
    width = max(1, dim // cfg.reduction_factor)
    ffn_size = model.get_submodule(sites[0].ffn_out).in_features
    geo = side_geometry(model, family, width, ffn_size, cfg.reduction_factor)
    keep = kept_hidden_dims(model, sites, width)
    side_blocks = [blocks.pruned_block(model.get_submodule(s.block), family, geo, keep) for s in sites]
    side = SideNetwork(dim, side_blocks, width, cfg, is_causal(model))
    model.add_module("lst_side", side)
    names = list(inspect.signature(model.forward).parameters)
    position = names.index("attention_mask") if "attention_mask" in names else len(names)
    model.register_forward_pre_hook(side.take_model_input(position), with_kwargs=True)
    model.register_forward_hook(side.restore_grad_mode, with_kwargs=True, always_call=True)
    model.get_submodule(sites[0].block).register_forward_pre_hook(side.take_input, with_kwargs=True)
    for site in sites:
        model.get_submodule(site.block).register_forward_hook(side.take_output, with_kwargs=True)
    keep_activations_off(model)
    if is_causal(model) and getattr(model, "generation_config", None) is not None:
        # The side attention keeps no key/value cache: each generated token reruns the whole sequence.
        model.generation_config.use_cache = False
    return model


METHOD = Method(
    name="lst", summary="ladder side-tuning: a narrow pruned side transformer; no backprop through the backbone",
    config_cls=LstConfig, inject=inject, merge=None,
    merge_hint="the side network is a separate model beside the backbone; nothing can be folded into its weights",
    paper="Sung et al. 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning")
