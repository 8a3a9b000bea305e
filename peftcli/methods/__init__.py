"""METHODS: the one explicit list of registered PEFT methods (adding a method = one file + one line here)."""
from __future__ import annotations

from ..errors import UserError
from . import bitfit, freeze, full, lora
from .registry import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    full.METHOD,
    freeze.METHOD,
    bitfit.METHOD,
    lora.METHOD,
)}


def get_method(name, where=None) -> Method:
    if name not in METHODS:
        from ..schema import did_you_mean

        message = f"unknown method {name!r}{did_you_mean(str(name), METHODS)}; registered: {', '.join(METHODS)}"
        raise where.error(message) if where else UserError(message)
    return METHODS[name]
