"""P-Tuning v2 (Liu et al. 2022): deep prompts, trainable keys and values in every layer, no reparameterisation."""
from __future__ import annotations

import dataclasses

from torch import nn

from ..config.schema import field, positive
from .prefix import install_prefix
from .prefix_tuning import MERGE_HINT, PrefixEncoder, plain_prefixes
from .registry import Method


@dataclasses.dataclass
class PTuningV2Config:
    # Liu et al. 2022, Sec. 4.4 / Fig. 4: simple classification peaks around 20 tokens, hard sequence labelling ~100.
    num_virtual_tokens: int = field(20, check=positive, doc="deep prompt length per layer")


def inject(model: nn.Module, cfg: PTuningV2Config) -> nn.Module:
    # Sec. 3.3: no reparameterisation encoder; the task head is trained as well (registry.unfreeze_head).
    return install_prefix(model, PrefixEncoder(model, cfg.num_virtual_tokens, None), "deep_prompt", "p_tuning_v2")


METHOD = Method(
    name="p_tuning_v2", summary="deep prompts: trainable keys/values in every layer, with a trained head",
    config_cls=PTuningV2Config, inject=inject, merge=None, merge_hint=MERGE_HINT,
    extra_state=plain_prefixes("deep_prompt"),
    tasks=frozenset({"sequence-classification", "causal-lm", "token-classification"}),
    paper="Liu et al. 2022, P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales")
