"""METHODS: the one explicit list of registered PEFT methods (adding a method = one file + one line here)."""
from __future__ import annotations

from ..errors import UserError
from . import bitfit, freeze, full, lora
from .registry import Method

# Each family keeps its own block (imports inside the block keep merges of parallel work trivial).
_SPINE = [full.METHOD, freeze.METHOD, bitfit.METHOD, lora.METHOD]
# -- reparameterised: LoRA variants, IA3, VeRA (issue 5a) --
_REPARAM_A: list[Method] = []
# -- reparameterised: AdaLoRA, GLoRA, Diff Pruning, QLoRA, SVD (issue 5b) --
_REPARAM_B: list[Method] = []
# -- additive: bottleneck adapters and friends (issue 8) --
_ADDITIVE: list[Method] = []
# -- prompt methods (issue 9) --
_PROMPT: list[Method] = []
# -- selective / training-time methods (issue 7) --
_SELECTIVE: list[Method] = []

METHODS: dict[str, Method] = {m.name: m for m in _SPINE + _REPARAM_A + _REPARAM_B + _ADDITIVE + _PROMPT + _SELECTIVE}


def get_method(name, where=None) -> Method:
    if name not in METHODS:
        from ..schema import did_you_mean

        message = f"unknown method {name!r}{did_you_mean(str(name), METHODS)}; registered: {', '.join(METHODS)}"
        raise where.error(message) if where else UserError(message)
    return METHODS[name]
