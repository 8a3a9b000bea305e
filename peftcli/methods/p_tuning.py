"""P-tuning (Liu et al. 2021, GPT Understands, Too): virtual tokens produced by an MLP or LSTM prompt encoder."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field, non_negative, positive
from .prefix import is_causal
from .prefix_tuning import MERGE_HINT
from .prompt_inputs import PromptSource, init_embeddings, install_prompts
from .prompt_tuning import TASKS, first_position
from .registry import Method


@dataclasses.dataclass
class PTuningConfig:
    num_virtual_tokens: int = field(20, check=positive, doc="virtual tokens before the input")
    tokens_after: int = field(0, check=non_negative, doc="more virtual tokens after the input (template P x P; "
                                                          "classification only)")
    encoder: Literal["mlp", "lstm"] = field("mlp", doc="prompt encoder: 2-layer MLP, or bi-LSTM + MLP (Sec. 3.2)")
    encoder_hidden_size: int = field(128, check=positive, doc="hidden width of the prompt encoder")


class PromptEncoder(PromptSource):
    """Trainable inputs h_0..h_m -> encoder -> virtual token embeddings; tokens of all groups are encoded together
    so the LSTM sees the whole template (Liu et al. 2021, Sec. 3.2: the encoder ties the prompts together)."""

    def __init__(self, model: nn.Module, cfg: PTuningConfig, groups):
        super().__init__()
        hidden = model.config.get_text_config().hidden_size
        count = sum(n for _, n in groups)
        device = model.get_input_embeddings().weight.device
        self.groups = groups
        self.prompt_inputs = nn.Parameter(init_embeddings(model, count, "vocab", None))
        width = hidden
        if cfg.encoder == "lstm":
            self.prompt_lstm = nn.LSTM(hidden, cfg.encoder_hidden_size, num_layers=2, bidirectional=True,
                                       batch_first=True, device=device)
            width = 2 * cfg.encoder_hidden_size
        self.prompt_mlp = nn.Sequential(nn.Linear(width, cfg.encoder_hidden_size, device=device), nn.ReLU(),
                                        nn.Linear(cfg.encoder_hidden_size, hidden, device=device))

    def embeddings(self) -> torch.Tensor:
        states = self.prompt_inputs
        if hasattr(self, "prompt_lstm"):
            states = self.prompt_lstm(states.unsqueeze(0))[0].squeeze(0)
        return self.prompt_mlp(states)


def inject(model: nn.Module, cfg: PTuningConfig) -> nn.Module:
    groups = [(first_position(model), cfg.num_virtual_tokens)]
    if cfg.tokens_after:
        if hasattr(model, "lm_head"):
            raise UserError("method.tokens_after: virtual tokens after the input need a classification task (in "
                            "causal-lm they would follow the response); set tokens_after: 0")
        # Encoders end the input with [SEP]: the template's second group goes before it.
        groups.append(("end" if is_causal(model) else -1, cfg.tokens_after))
    return install_prompts(model, PromptEncoder(model, cfg, groups), "prompt_encoder")


METHOD = Method(
    name="p_tuning", summary="virtual tokens from an MLP/LSTM prompt encoder, placed by a template",
    config_cls=PTuningConfig, inject=inject, merge=None, merge_hint=MERGE_HINT, tasks=TASKS,
    paper="Liu et al. 2021, GPT Understands, Too")
