"""Ladder Side-Tuning (Sung et al. 2022): a narrow side network fed by the frozen backbone through gated ladders."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..schema import field, positive
from . import bottleneck as bn
from .registry import Method


@dataclasses.dataclass
class LstConfig:
    # Sung et al. 2022, Sec. 3: the side network is 1/r as wide as the backbone, r = 8 by default.
    reduction_factor: int = field(8, check=positive, doc="side width = hidden / this")
    # Sec. 3: ladder gate mu = sigmoid(alpha / T) with T = 0.1 and alpha initialised at 0.
    gate_temperature: float = field(0.1, check=positive, doc="T in the ladder gate sigmoid(alpha / T)")
    nonlinearity: str = field("gelu", check=bn.check_activation, doc="activation inside each side block")


class SideBlock(nn.Module):
    """Pre-norm residual feed-forward block of the side network. It is token-wise: token mixing already happened
    in the backbone states the ladders feed in."""

    def __init__(self, width: int, nonlinearity: str, device):
        super().__init__()
        self.norm = nn.LayerNorm(width, device=device)
        self.ff = bn.Bottleneck(width, 4 * width, nonlinearity, device, init_std=0.02)

    def forward(self, x):
        return x + self.ff(self.norm(x))


class SideNetwork(nn.Module):
    """Ladders from the embeddings and every block output into a side network; its result is added (through a
    zero-initialised up-projection) to the backbone's detached last hidden state, so no gradient enters the
    backbone and none of its activations are kept for backward."""

    def __init__(self, dim: int, layers: int, cfg: LstConfig, device):
        super().__init__()
        width = max(1, dim // cfg.reduction_factor)
        self.ladders = nn.ModuleList(nn.Linear(dim, width, device=device) for _ in range(layers + 1))
        self.blocks = nn.ModuleList(SideBlock(width, cfg.nonlinearity, device) for _ in range(layers))
        self.gate_logits = nn.Parameter(torch.zeros(layers, device=device))
        self.up = nn.Linear(width, dim, device=device)
        nn.init.zeros_(self.up.weight)  # starts as the unchanged backbone
        nn.init.zeros_(self.up.bias)
        self.temperature = cfg.gate_temperature
        self.states: list[torch.Tensor] = []

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits / self.temperature)

    def run(self, last: torch.Tensor) -> torch.Tensor:
        states, self.states = self.states, []
        side = self.ladders[0](states[0])
        gates = self.gates()
        for i, block in enumerate(self.blocks):
            side = block(gates[i] * self.ladders[i + 1](states[i + 1]) + (1 - gates[i]) * side)
        return last + self.up(side).to(last.dtype)

    def take_input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.states = [hidden.detach().float()]

    def take_output(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.states.append(hidden.detach().float())
        if len(self.states) < len(self.ladders):
            return None
        result = self.run(hidden.detach())
        return (result, *output[1:]) if isinstance(output, tuple) else result


def inject(model: nn.Module, cfg: LstConfig) -> nn.Module:
    sites = sorted(bn.find_sites(model), key=lambda s: s.layer)
    dim = bn.hidden_size(model, sites[0])
    device = model.get_submodule(sites[0].ffn_out).weight.device
    side = SideNetwork(dim, len(sites), cfg, device)
    model.add_module("lst_side", side)
    model.get_submodule(sites[0].block).register_forward_pre_hook(side.take_input, with_kwargs=True)
    for site in sites:
        model.get_submodule(site.block).register_forward_hook(side.take_output, with_kwargs=True)
    return model


METHOD = Method(
    name="lst", summary="ladder side-tuning: a narrow side network; no backprop through the backbone",
    config_cls=LstConfig, inject=inject, merge=None,
    merge_hint="the side network is a separate model beside the backbone; nothing can be folded into its weights",
    paper="Sung et al. 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning")
