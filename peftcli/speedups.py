"""Swaps a decoder's RMSNorm and SwiGLU MLP modules for fused-kernel versions that keep every parameter name."""
from __future__ import annotations

from torch import nn

from .kernels.fused import rms_norm, swiglu
from .methods.registry import replace_module

# Norms whose forward is exactly `weight * normalise(x.float()).to(x.dtype)` (Gemma's `1 + weight` is not).
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# MLPs whose forward is exactly `down(act(gate(x)) * up(x))`.
FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class FusedRMSNorm(nn.Module):
    """Same parameter (`weight`) and output as the HF norm it replaces; saves no fp32 activation."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.weight = base.weight
        self.variance_epsilon = base.variance_epsilon

    def forward(self, x):
        return rms_norm(x, self.weight, self.variance_epsilon)


class FusedSwiGLUMLP(nn.Module):
    """Same submodules (gate_proj/up_proj/down_proj, possibly method-wrapped) as the HF MLP it replaces."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = base.gate_proj, base.up_proj, base.down_proj

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def use_fused_kernels(model: nn.Module) -> int:
    """Replace every fusable norm and SwiGLU MLP in place; returns how many modules were swapped.
    Works before or after a method is injected, since the swapped modules keep their children."""
    swapped = 0
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind in FUSABLE_NORMS:
            replace_module(model, name, FusedRMSNorm(module))
        elif kind in FUSABLE_MLPS and getattr(module.config, "hidden_act", None) in ("silu", "swish"):
            replace_module(model, name, FusedSwiGLUMLP(module))
        else:
            continue
        swapped += 1
    return swapped
