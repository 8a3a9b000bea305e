"""Prompt tuning (Lester et al. 2021): N trainable virtual token embeddings prepended to the input."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..config.schema import field, positive
from .prefix import is_causal
from .prefix_tuning import MERGE_HINT
from .prompt_inputs import PromptSource, init_embeddings, install_prompts
from .registry import Method

TASKS = frozenset({"sequence-classification", "causal-lm", "token-classification"})


@dataclasses.dataclass
class PromptTuningConfig:
    # Lester et al. 2021, Sec. 3.2 / Fig. 3(a): 20 tokens is where quality plateaus for large models.
    num_virtual_tokens: int = field(20, check=positive, doc="number of virtual tokens")
    init: Literal["random", "vocab", "text"] = field("vocab", doc="random | vocab (common tokens) | text (init_text)")
    init_text: str | None = field(None, doc="words whose embeddings start the prompt, e.g. 'Classify the sentiment:'")


def validate(cfg: PromptTuningConfig) -> str | None:
    if cfg.init == "text" and not cfg.init_text:
        return "init: text needs init_text (e.g. init_text: 'Classify the sentiment:'); or use init: vocab"
    return None


class SoftPrompt(PromptSource):
    def __init__(self, initial: torch.Tensor, position: int | str = 0):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(initial)
        self.groups = [(position, initial.shape[0])]

    def embeddings(self) -> torch.Tensor:
        return self.prompt_embeddings


def inject(model: nn.Module, cfg: PromptTuningConfig) -> nn.Module:
    initial = init_embeddings(model, cfg.num_virtual_tokens, cfg.init, cfg.init_text)
    return install_prompts(model, SoftPrompt(initial, first_position(model)), "prompt_encoder")


def first_position(model: nn.Module) -> int:
    """Prepend (Lester et al. 2021, Sec. 2); encoders keep [CLS] first, since their pooler and head read it."""
    return 0 if is_causal(model) else 1


METHOD = Method(
    name="prompt_tuning", summary="trainable virtual token embeddings prepended to the input",
    config_cls=PromptTuningConfig, inject=inject, merge=None, merge_hint=MERGE_HINT, validate=validate, tasks=TASKS,
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning")
