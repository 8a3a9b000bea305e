"""Trigger tokens: a handful of trainable token embeddings inserted at a chosen place in the input template."""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from ..schema import field, positive
from .prefix_tuning import MERGE_HINT
from .prompt_inputs import init_embeddings, install_prompts
from .prompt_tuning import TASKS, SoftPrompt
from .registry import Method


@dataclasses.dataclass
class TriggerTokensConfig:
    num_tokens: int = field(4, check=positive, doc="number of trigger tokens")
    position: int | Literal["end"] = field(
        1, doc="where they go in the input: k >= 0 after its first k tokens (1: after [CLS]/BOS), k < 0 before its "
               "last -k tokens (-1: before [SEP]), end: after its last token")
    init_text: str | None = field(None, doc="words the triggers start from (repeated to num_tokens); default: "
                                            "common vocabulary tokens")


def inject(model: nn.Module, cfg: TriggerTokensConfig) -> nn.Module:
    initial = init_embeddings(model, cfg.num_tokens, "text" if cfg.init_text else "vocab", cfg.init_text, seed=1)
    return install_prompts(model, SoftPrompt(initial, cfg.position), "trigger_encoder")


METHOD = Method(
    name="trigger_tokens", summary="a few trainable trigger tokens at a chosen position of the input",
    config_cls=TriggerTokensConfig, inject=inject, merge=None, merge_hint=MERGE_HINT, tasks=TASKS,
    paper="Wallace et al. 2019 (triggers), continuous as in Lester et al. 2021")
