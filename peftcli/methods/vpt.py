"""Visual Prompt Tuning (Jia et al. 2022): learned prompt tokens after [CLS] of a ViT, shallow or in every layer."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field, positive
from .prefix_tuning import MERGE_HINT
from .registry import Method
from .signatures import require_hidden_states_first


@dataclasses.dataclass
class VptConfig:
    # Jia et al. 2022, Sec. 4.2 / Fig. 6: a few to ~50 prompts; 10 is a common middle.
    num_prompts: int = field(10, check=positive, doc="prompt tokens per layer")
    variant: Literal["shallow", "deep"] = field("deep", doc="shallow: first layer only; deep: every layer (Sec. 3.2)")


class VisualPrompts(nn.Module):
    """Prompts [layers or 1, P, hidden]. Shallow: inserted after [CLS] once, then carried through the layers.
    Deep: each layer's prompt outputs are replaced by that layer's own prompts (Jia et al. 2022, Eq. 5-6)."""

    def __init__(self, count: int, layers: int, hidden: int, patch_dim: int, device):
        super().__init__()
        # Xavier-uniform over the patch embedding's fan-in plus the width, as in the authors' code.
        bound = math.sqrt(6.0 / (patch_dim + hidden))
        self.vpt_prompts = nn.Parameter(torch.empty(layers, count, hidden, device=device).uniform_(-bound, bound))

    def put(self, hidden: torch.Tensor, layer: int, replace: bool) -> torch.Tensor:
        prompts = self.vpt_prompts[layer].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        rest = hidden[:, 1 + prompts.shape[1]:] if replace else hidden[:, 1:]
        return torch.cat([hidden[:, :1], prompts, rest], dim=1)


def vit_parts(model: nn.Module):
    base = model.base_model
    embeddings = getattr(base, "embeddings", None)
    # transformers 5 ViTs keep their blocks in `layers`; older layouts in `encoder.layer`
    layers = getattr(base, "layers", None) or getattr(getattr(base, "encoder", None), "layer", None)
    if embeddings is None or layers is None:
        raise UserError(f"method.name: vpt needs a ViT-style model (embeddings + transformer layers); "
                        f"{type(model).__name__} is not one")
    return embeddings, layers


def inject(model: nn.Module, cfg: VptConfig) -> nn.Module:
    embeddings, layers = vit_parts(model)
    config = model.config
    patch = getattr(config, "patch_size", 16)
    patch_dim = getattr(config, "num_channels", 3) * (patch * patch if isinstance(patch, int) else math.prod(patch))
    count = len(layers) if cfg.variant == "deep" else 1
    prompts = VisualPrompts(cfg.num_prompts, count, config.hidden_size, patch_dim,
                            next(model.parameters()).device)
    model.add_module("vpt_prompt", prompts)  # registered on the model: saved, restored, checkpointed with it
    embeddings.register_forward_hook(lambda module, args, output: prompts.put(output, 0, replace=False))
    if cfg.variant == "deep":
        for index, layer in enumerate(layers):
            if index > 0:
                require_hidden_states_first(layer, "vpt (deep)")
                layer.register_forward_pre_hook(_replace_hook(prompts, index), with_kwargs=True)
    return model


def _replace_hook(prompts: VisualPrompts, index: int):
    def hook(module, args, kwargs):
        if args:
            return (prompts.put(args[0], index, replace=True), *args[1:]), kwargs
        kwargs["hidden_states"] = prompts.put(kwargs["hidden_states"], index, replace=True)
        return args, kwargs

    return hook


METHOD = Method(
    name="vpt", summary="visual prompt tokens after [CLS] of a ViT (shallow or deep), with the head trained",
    config_cls=VptConfig, inject=inject, merge=None, merge_hint=MERGE_HINT,
    tasks=frozenset({"image-classification"}), paper="Jia et al. 2022, Visual Prompt Tuning")
