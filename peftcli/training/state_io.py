"""Training state (optimizer, scheduler, RNG, callbacks) as JSON + safetensors: nothing is pickled."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

# Markers for values JSON cannot hold directly: tensors live in the .safetensors file under a key.
_TENSOR, _NDARRAY, _TUPLE, _INTKEYS = "__tensor__", "__ndarray__", "__tuple__", "__intkeys__"


def _flatten(value, tensors: dict, prefix: str):
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(value, np.ndarray):
        tensors[prefix] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
        return {_NDARRAY: prefix, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {_TUPLE: [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        # Optimizer state is keyed by parameter index: remember int keys so they come back as ints.
        out = {str(k): _flatten(v, tensors, f"{prefix}.{k}") for k, v in value.items()}
        if value and all(isinstance(k, int) for k in value):
            return {_INTKEYS: out}
        return out
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in training state (only tensors, arrays, numbers, text)")


def _restore(value, tensors: dict):
    if isinstance(value, list):
        return [_restore(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _NDARRAY in value:
        return tensors[value[_NDARRAY]].numpy().astype(value["dtype"])
    if _TUPLE in value:
        return tuple(_restore(v, tensors) for v in value[_TUPLE])
    if _INTKEYS in value:
        return {int(k): _restore(v, tensors) for k, v in value[_INTKEYS].items()}
    return {k: _restore(v, tensors) for k, v in value.items()}


def save_state(obj, base: Path) -> list[Path]:
    """Write `obj` as <base>.json (+ <base>.safetensors when it holds tensors); returns the files written."""
    base = Path(base)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(obj, tensors, "t")
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(tree), encoding="utf-8")
    written = [json_path]
    if tensors:
        save_file(tensors, str(base.with_suffix(".safetensors")))
        written.append(base.with_suffix(".safetensors"))
    return written


def load_state(base: Path):
    base = Path(base)
    json_path = base.with_suffix(".json")
    if not json_path.is_file():
        raise UserError(f"{json_path}: missing from the checkpoint; resume from another checkpoint-N")
    tree = json.loads(json_path.read_text(encoding="utf-8"))
    tensor_path = base.with_suffix(".safetensors")
    tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
    return _restore(tree, tensors)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state()  # this process's own device
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(state["cuda"])
