"""Soft trigger tokens: a handful of trainable embeddings (not vocabulary tokens) at a chosen place of the input."""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from ..config.schema import field, positive
from .prefix_tuning import MERGE_HINT
from .prompt_inputs import init_embeddings, install_prompts
from .prompt_tuning import TASKS, SoftPrompt
from .registry import Method

POSITION_DOC = ("where they go in the input: k >= 0 after its first k tokens (1: after [CLS]/BOS), k < 0 before its "
                "last -k tokens (-1: before [SEP]), end: after its last token")


@dataclasses.dataclass
class SoftTriggerTokensConfig:
    num_tokens: int = field(4, check=positive, doc="number of trigger embeddings")
    position: int | Literal["end"] = field(1, doc=POSITION_DOC)
    init_text: str | None = field(None, doc="words the embeddings start from (repeated to num_tokens); default: "
                                            "common vocabulary tokens")


def inject(model: nn.Module, cfg: SoftTriggerTokensConfig) -> nn.Module:
    initial = init_embeddings(model, cfg.num_tokens, "text" if cfg.init_text else "vocab", cfg.init_text, seed=1)
    return install_prompts(model, SoftPrompt(initial, cfg.position), "trigger_encoder")


METHOD = Method(
    name="soft_trigger_tokens", summary="a few trainable embeddings at a chosen position of the input (continuous "
                                        "triggers; trigger_tokens is the discrete search)",
    config_cls=SoftTriggerTokensConfig, inject=inject, merge=None, merge_hint=MERGE_HINT, tasks=TASKS,
    paper="Wallace et al. 2019 (trigger placement), trained continuously as in Lester et al. 2021")
