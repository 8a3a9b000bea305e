"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer, MLP-reparameterised."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config.schema import field, positive
from .prefix import PrefixSource, install_prefix, kv_geometry, split_states
from .registry import Method

MERGE_HINT = ("the prefixes are extra keys and values, not a change to any weight, so there is nothing to fold; "
              "run the adapter with the run directory, or write the prefixes with `peft export`")


@dataclasses.dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = field(20, check=positive, doc="prefix length per layer")
    encoder_hidden_size: int = field(512, check=positive, doc="hidden width of the reparameterisation MLP")
    reparameterize: bool = field(True, doc="train prefixes through an MLP (Li & Liang 2021, Sec. 4.3)")


class PrefixEncoder(PrefixSource):
    """P prefix embeddings -> MLP -> keys and values for every layer. `prefix_kv` holds the plain prefixes the MLP
    produces, refreshed at every save, so they can be used or exported without the MLP."""

    def __init__(self, model: nn.Module, tokens: int, encoder_hidden_size: int | None):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = kv_geometry(model)
        self.num_tokens = tokens
        width = self.layers * 2 * self.kv_heads * self.head_dim
        device = model.get_input_embeddings().weight.device
        hidden = model.config.get_text_config().hidden_size
        self.reparameterize = encoder_hidden_size is not None
        if self.reparameterize:
            self.prefix_tokens = nn.Parameter(torch.randn(self.num_tokens, hidden, device=device) * 0.02)
            # Li & Liang 2021, Sec. 4.3: P = MLP(P'), a smaller P' plus a large feed-forward network; training the
            # prefixes directly is unstable.
            self.prefix_mlp = nn.Sequential(nn.Linear(hidden, encoder_hidden_size, device=device), nn.Tanh(),
                                            nn.Linear(encoder_hidden_size, width, device=device))
        else:
            self.prefix_flat = nn.Parameter(torch.randn(self.num_tokens, width, device=device) * 0.02)
        self.register_buffer("prefix_kv", torch.zeros(self.layers, 2, self.num_tokens, width // self.layers // 2,
                                                      device=device))

    def flat(self) -> torch.Tensor:
        """[layers, 2, P, kv_heads * head_dim]."""
        out = self.prefix_mlp(self.prefix_tokens) if self.reparameterize else self.prefix_flat
        return out.view(self.num_tokens, self.layers, 2, -1).permute(1, 2, 0, 3)

    def states(self, batch: int):
        return split_states(self.flat(), batch, self.kv_heads, self.head_dim)


def inject(model: nn.Module, cfg: PrefixTuningConfig) -> nn.Module:
    hidden = cfg.encoder_hidden_size if cfg.reparameterize else None
    return install_prefix(model, PrefixEncoder(model, cfg.num_virtual_tokens, hidden), "prefix_encoder", "prefix_tuning")


def plain_prefixes(attr: str):
    """extra_state: the plain prefixes (what the MLP currently produces), saved beside the trainable tensors."""
    def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
        encoder = getattr(model, attr)
        with torch.no_grad():
            encoder.prefix_kv.copy_(encoder.flat())
        return {f"{attr}.prefix_kv": encoder.prefix_kv}

    return extra_state


METHOD = Method(
    name="prefix_tuning", summary="trainable key/value prefixes in every attention layer (MLP-reparameterised)",
    config_cls=PrefixTuningConfig, inject=inject, merge=None, merge_hint=MERGE_HINT,
    extra_state=plain_prefixes("prefix_encoder"),
    tasks=frozenset({"sequence-classification", "causal-lm", "token-classification"}),
    paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation")
