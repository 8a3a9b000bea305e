"""Pure-PyTorch speed-critical building blocks of the LoRA path (adapter linear, chunked LM loss)."""

from .lora import lora_delta_weight, lora_linear, mm_fp32
from .loss import chunked_causal_lm_loss

__all__ = ["chunked_causal_lm_loss", "lora_delta_weight", "lora_linear", "mm_fp32"]
