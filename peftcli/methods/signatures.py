"""What methods that hook into a model's layers expect of their call signatures, checked when they are injected.

Hooks read arguments by name (the key/value cache, the hidden states). When a transformers release renames one,
a hook that looks for the old name finds nothing and the method silently stops doing anything; these checks turn
that into an error at inject time that names the module and the argument.
"""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import UserError

# The key/value cache argument: `cache` from transformers 5.24 on (`past_key_values` kept as a deprecated alias
# of the model's forward), `past_key_values` before.
CACHE_NAMES = ("cache", "past_key_values")
HIDDEN_NAMES = ("hidden_states", "input", "x")


def _parameters(module: nn.Module) -> list[str]:
    return list(inspect.signature(module.forward).parameters)


def _fix_hint() -> str:
    return "install the tested versions (pip install -c constraints.txt -e .) or pick another method"


def cache_argument(module: nn.Module, method: str) -> str:
    """The name under which `module.forward` takes the key/value cache."""
    names = _parameters(module)
    for name in CACHE_NAMES:
        if name in names:
            return name
    raise UserError(f"method.name: {method} passes its prefix to attention through the key/value cache, but "
                    f"{type(module).__name__}.forward takes neither `cache` nor `past_key_values` (it takes "
                    f"{', '.join(names) or 'nothing'}); {_fix_hint()}")


def attention_modules(model: nn.Module, method: str) -> list[nn.Module]:
    """The model's attention modules (BertAttention and BertSelfAttention, LlamaAttention, ...)."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    if not found:
        raise UserError(f"method.name: {method} hooks into attention, and {type(model).__name__} has no module "
                        f"named *Attention; use a transformers model with self-attention layers")
    return found


def require_cache_in_attention(model: nn.Module, method: str) -> str:
    """Check that the model and every attention module take the cache; returns the model-level argument name.
    Task wrappers (BertForSequenceClassification...) may pass it on through **kwargs to their base model."""
    for module in attention_modules(model, method):
        cache_argument(module, method)
    top = inspect.signature(model.forward).parameters
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in top.values())
    base = getattr(model, "base_model", model)
    return cache_argument(base if passes_on and base is not model else model, method)


def require_hidden_states_first(module: nn.Module, method: str) -> None:
    """Hooks that rewrite or read a layer's input take it from the first argument (or `hidden_states=`)."""
    names = _parameters(module)
    if not names or names[0] not in HIDDEN_NAMES:
        raise UserError(f"method.name: {method} reads the hidden states as the first input of "
                        f"{type(module).__name__}, whose forward starts with {names[0] if names else 'nothing'!r}; "
                        f"{_fix_hint()}")
