"""Speed-ups that keep every parameter name: fused RMSNorm / SwiGLU / rotary kernels, and the chunked causal-LM
loss."""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .kernels.fused import rms_norm, swiglu
from .modules import replace_module

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


def use_fused_kernels(model: nn.Module, rotary: bool = True) -> int:
    """Replace every fusable norm and SwiGLU MLP in place; returns how many modules were swapped.
    Works before or after a method is injected, since the swapped modules keep their children.
    The architecture's rotary embedding becomes the one-pass kernel too (kernels/rope.py); that swap is of the
    module's `apply_rotary_pos_emb` function, so it holds for every model of the architecture in the process
    (off CUDA the wrapper calls the original); `rotary=False` leaves it alone."""
    swapped = 0
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind in FUSABLE_NORMS:
            if rotary:
                _fuse_rotary(sys.modules[type(module).__module__])
            replace_module(model, name, FusedRMSNorm(module))
        elif kind in FUSABLE_MLPS and getattr(module.config, "hidden_act", None) in ("silu", "swish"):
            replace_module(model, name, FusedSwiGLUMLP(module))
        else:
            continue
        swapped += 1
    return swapped


def _fuse_rotary(modeling) -> None:
    from .kernels.rope import fused_rotary

    if hasattr(modeling, "apply_rotary_pos_emb"):
        modeling.apply_rotary_pos_emb = fused_rotary(modeling.apply_rotary_pos_emb)


# Decoders whose forward is `loss_function(lm_head(hidden), labels)` with nothing non-linear in between
# (Gemma 2's logit soft-cap is, and is left out by the soft-cap check as well).
CHUNKED_LOSS_MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma")


def install_chunked_loss(model: nn.Module, chunk_tokens: int = 2048) -> nn.Module | None:
    """`model.chunked_loss`: let training steps compute cross entropy from the hidden states chunk by chunk
    (kernels/loss.py) instead of from a (tokens, vocab) logits tensor and its fp32 copy.

    The LM head keeps its module, parameter and forward; while `hidden_states_to_loss(head)` is active it hands
    its input through unchanged and the model's `loss_function` applies the head inside the chunked loss. Both
    happen inside the model's own forward, so data-parallel wrappers and hooks of the methods see an ordinary
    call. Returns the head, or None where the model does not qualify (other architectures, a head with a bias,
    a method-wrapped or quantised head, a logit soft-cap)."""
    from .kernels.loss import chunked_causal_lm_loss

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if (type(head) is not nn.Linear or head.bias is not None or config is None
            or config.model_type not in CHUNKED_LOSS_MODELS or getattr(config, "final_logit_softcapping", None)):
        return None
    plain_forward, default_loss = head.forward, model.loss_function
    head.peft_hidden_to_loss = False

    def forward(hidden):
        return hidden if head.peft_hidden_to_loss else plain_forward(hidden)

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                      **kwargs):
        if head.peft_hidden_to_loss and shift_labels is None:
            device = logits.device.type
            if torch.is_autocast_enabled(device):  # the head's matmul in the autocast dtype, as nn.Linear's would be
                with torch.autocast(device, enabled=False):
                    return chunked_causal_lm_loss(logits.to(torch.get_autocast_dtype(device)), head.weight, labels,
                                                  chunk_tokens, num_items_in_batch, ignore_index=ignore_index)
            return chunked_causal_lm_loss(logits, head.weight, labels, chunk_tokens, num_items_in_batch,
                                          ignore_index=ignore_index)
        if head.peft_hidden_to_loss:  # pre-shifted labels (context parallelism): the plain loss on real logits
            logits = plain_forward(logits)
        return default_loss(logits=logits, labels=labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch,
                            ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)

    head.forward = forward
    model.loss_function = loss_function
    return head


@contextlib.contextmanager
def hidden_states_to_loss(head: nn.Module | None):
    """Within this block a training forward of the model returns the chunked loss, and hidden states where its
    logits would be: for the Trainer's loss step only, never for callers that want logits."""
    if head is None:
        yield
        return
    head.peft_hidden_to_loss = True
    try:
        yield
    finally:
        head.peft_hidden_to_loss = False
