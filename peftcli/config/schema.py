"""Typed dataclass validation of YAML mappings: unknown keys with "did you mean", types, ranges, file:line."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from ..errors import UserError
from .yamlio import LocDict


@dataclasses.dataclass
class Where:
    """Where a value came from: the recipe file, its key path and line, for error messages."""

    source: str
    path: str
    line: int | None = None

    def child(self, key: str, mapping: Any) -> "Where":
        path = f"{self.path}.{key}" if self.path else key
        if isinstance(mapping, LocDict) and key in mapping.origins:
            return Where(mapping.origins[key], path, None)  # set on the command line, not in the file
        line = mapping.lines.get(key, self.line) if isinstance(mapping, LocDict) else self.line
        return Where(self.source, path, line)

    def error(self, message: str) -> UserError:
        loc = f"{self.source}:{self.line}" if self.line else self.source
        return UserError(f"{loc}: {self.path}: {message}" if self.path else f"{loc}: {message}")


# Names users bring from HF peft, axolotl and LLaMA-Factory configs.
SYNONYMS = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lr": "learning_rate",
            "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
            "micro_batch_size": "per_device_train_batch_size", "base_model": "name_or_path",
            "model_name_or_path": "name_or_path", "lora_target_modules": "target_modules",
            "sequence_len": "max_length", "cutoff_len": "max_length", "max_seq_length": "max_length"}


def did_you_mean(word: str, options) -> str:
    options = list(options)
    if SYNONYMS.get(word) in options:
        return f" (did you mean '{SYNONYMS[word]}'?)"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(data: dict, allowed, where: Where, what: str) -> None:
    for key in data:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            accepted = ", ".join(sorted(allowed)) if len(allowed) <= 25 else "see its documentation"
            raise where.child(key, data).error(f"unknown key{hint}; {what} accepts: {accepted}")


@functools.lru_cache(maxsize=None)
def init_field_names(module: str, class_name: str) -> frozenset[str]:
    """The __init__ fields of a dataclass, read from its module's source without importing the module.
    Why: importing transformers.training_args (for TrainingArguments' keys) loads the trainer stack, HF peft and
    bitsandbytes: ~4 s and a bitsandbytes warning in every `peft validate`. A class that is not a plain
    `@dataclass` without bases in that file (inherited fields, an upstream refactor) is imported instead."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8")) if spec and spec.origin else ast.Module([], [])
    found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name]
    plain = (len(found) == 1 and not found[0].bases
             and [ast.unparse(d) for d in found[0].decorator_list] in (["dataclass"], ["dataclasses.dataclass"]))
    names = frozenset(_init_fields(found[0])) if plain else frozenset()
    if not names:
        cls = getattr(importlib.import_module(module), class_name)
        names = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
    return names


def _init_fields(cls: ast.ClassDef):
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if any(marker in ast.unparse(node.annotation) for marker in ("ClassVar", "InitVar", "KW_ONLY")):
            continue  # not fields (dataclasses.fields leaves them out too)
        value = node.value
        keywords = value.keywords if isinstance(value, ast.Call) else []
        if not any(k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                   for k in keywords):
            yield node.target.id


def build(cls, data: Any, where: Where):
    """Build dataclass `cls` from a mapping, checking keys and types; field metadata may carry
    `check(value) -> error message | None` for ranges."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise where.error(f"expected a mapping of keys, got {_type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, fields, where, f"'{where.path or 'this section'}'")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        child = where.child(name, data)
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise child.error("is required")
            continue
        value = convert(data[name], hints[name], child)
        check = field.metadata.get("check")
        message = check(value) if check and value is not None else None
        if message:
            raise child.error(message)
        values[name] = value
    return cls(**values)


def convert(value: Any, annotation, where: Where):
    """Check `value` against a type annotation; ints are accepted for floats."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, where)
            except UserError as exc:
                errors.append(exc)
        nested = dataclasses.is_dataclass(args[0]) or get_origin(args[0]) is dict
        if len(errors) == 1 and nested and isinstance(value, dict):
            raise errors[0]  # an optional section or mapping: its own message names the inner key
        raise where.error(f"expected {_describe(annotation)}, got {_type_name(value)} {value!r}")
    if origin is Literal:
        if value not in args:
            raise where.error(f"must be one of {', '.join(map(str, args))}; got {value!r}"
                              f"{did_you_mean(str(value), map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise where.error(f"expected a list, got {_type_name(value)} {value!r}")
        return [convert(v, args[0], Where(where.source, f"{where.path}[{i}]", where.line)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise where.error(f"expected a mapping, got {_type_name(value)}")
        return {k: convert(v, args[1], where.child(k, value)) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        raise where.error(f"expected {annotation.__name__}, got boolean {value}")
    if annotation is float and isinstance(value, str):
        raise where.error(f"expected a number, got text {value!r}")
    if not isinstance(value, annotation):
        raise where.error(f"expected {_describe(annotation)}, got {_type_name(value)} {value!r}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "a mapping", LocDict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing (null)"}.get(type(value), type(value).__name__)


def _describe(annotation) -> str:
    names = {str: "text", int: "an integer", float: "a number", bool: "true/false", dict: "a mapping", list: "a list"}
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation) if a is not type(None))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def positive(value) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def non_negative(value) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def fraction(value) -> str | None:
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value}"


def open_fraction(value) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


def field(default=dataclasses.MISSING, *, check=None, doc: str = "", factory=dataclasses.MISSING):
    """A dataclass field with an optional range check and a one-line doc (shown by `peft methods`)."""
    meta = {"check": check, "doc": doc}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
