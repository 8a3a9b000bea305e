"""A run's trained tensors: saved exactly as the method made them trainable (plus its extra state), loaded back
into a model prepared the same way."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..files import METHOD_JSON, TENSORS, atomic_save_tensors, atomic_write
from . import METHODS, get_method
from .registry import trainable_state


def save_trained(model: torch.nn.Module, output_dir: str | Path, record: dict, gathered: dict | None = None) -> None:
    """The run's weights: exactly the trainable tensors (+ the method's declared extra state) and method.json.
    `gathered`: the full state dict accelerate assembled from all ranks (FSDP / ZeRO-3 shard the parameters,
    so the local ones are only pieces); the trainable tensors are then taken from it by name."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    method = get_method(record["method"])
    tensors = dict(trainable_state(model))
    if gathered:  # wrapper prefixes (DDP's module., compile's _orig_mod.) are not part of the names
        gathered = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in gathered.items()}
        tensors = {name: gathered[name] for name in tensors}
    if method.extra_state:
        tensors.update(method.extra_state(model))
    if method.pack_state:
        tensors = method.pack_state(model, tensors)
    atomic_save_tensors(tensors, output_dir / TENSORS, metadata={"format": "pt", "method": record["method"]})
    atomic_write(output_dir / METHOD_JSON, json.dumps(record, indent=2))


def load_tensors_into(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: missing; the run did not finish saving (resume it, or use a checkpoint)")
    tensors = _unpack(model, path, load_file(str(path)))
    expected = set(trainable_state(model))
    missing = sorted(expected - set(tensors))
    if missing:
        raise UserError(f"{path}: lacks {len(missing)} trained tensors (e.g. {missing[0]}); it does not belong to "
                        f"this recipe's method")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise UserError(f"{path}: holds tensors this model does not have (e.g. {result.unexpected_keys[0]})")


def _unpack(model: torch.nn.Module, path: Path, tensors: dict) -> dict:
    """Undo the method's pack_state (named in the file's metadata by save_trained)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        name = (handle.metadata() or {}).get("method")
    method = get_method(name) if name in METHODS else None
    return method.unpack_state(model, tensors) if method and method.unpack_state else tensors
