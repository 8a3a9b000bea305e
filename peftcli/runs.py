"""The run directory: atomic writes, saving/loading trained tensors, rebuilding a trained model from a run."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .methods import METHODS, get_method
from .methods.registry import freeze_all, trainable_state, unfreeze_head
from .recipe import Recipe, dump_recipe, load_recipe

FORMAT_VERSION = 1
TENSORS = "adapter.safetensors"
METHOD_JSON = "method.json"
RECIPE = "recipe.yaml"


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: readers see the old file or
    the new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def method_record(recipe: Recipe, model: torch.nn.Module, labels: list[str] | None) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"format_version": FORMAT_VERSION, "method": recipe.method_name,
            "config": dataclasses.asdict(recipe.method), "task": recipe.model.task,
            "base_model": recipe.model.name_or_path, "labels": labels,
            "num_labels": recipe.model.num_labels if labels is None else len(labels),
            "trainable_params": trainable, "total_params": total,
            **({"share_across_layers": True} if recipe.share_across_layers else {})}


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


def prepare_model(model: torch.nn.Module, method_name: str, cfg, share_across_layers: bool = False):
    """Freeze the base, inject the method (optionally tying its tensors across layers), train the task head."""
    freeze_all(model)
    base = {id(p) for p in model.parameters()} if share_across_layers else set()
    model = get_method(method_name).inject(model, cfg)
    if share_across_layers:
        from .sharing import tie_across_layers

        tie_across_layers(model, method_name, cfg, base)
    unfreeze_head(model)
    return model


def is_run_dir(path: Path) -> bool:
    return (path / RECIPE).is_file() and (path / METHOD_JSON).is_file()


def read_run(run_dir: str | Path) -> tuple[Recipe, dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; pass a run directory made by `peft train`")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a finished peftcli run (no {RECIPE} + {METHOD_JSON}); "
                        f"pass the output_dir of `peft train`")
    recipe = load_recipe(run_dir / RECIPE)
    record = json.loads((run_dir / METHOD_JSON).read_text(encoding="utf-8"))
    if record.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{run_dir / METHOD_JSON}: format version {record.get('format_version')} is not supported "
                        f"by this peftcli (expects {FORMAT_VERSION})")
    return recipe, record


def load_trained(run_dir: str | Path, weights_dir: str | Path | None = None):
    """(recipe, record, model with trained tensors, tokenizer) from a run directory (or one of its checkpoints)."""
    from .models import load_model, load_tokenizer

    recipe, record = read_run(run_dir)
    weights_dir = Path(weights_dir or run_dir)
    if record.get("tasks"):
        from .multitask import load_task_model, tasks_from_record

        model = load_task_model(recipe, tasks_from_record(record))
    else:
        model = load_model(recipe.model, record.get("num_labels"), record.get("labels"))
        model = prepare_model(model, recipe.method_name, recipe.method, recipe.share_across_layers)
    load_tensors_into(model, weights_dir / TENSORS)
    if recipe.layerdrop is not None and recipe.layerdrop.prune_layers:
        from .layerdrop import prune_layers

        model = prune_layers(model, recipe.layerdrop)  # the inference-time form of a LayerDrop-trained run
    model.eval()
    return recipe, record, model, load_tokenizer(recipe.model)


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


def write_recipe(recipe: Recipe, output_dir: Path) -> None:
    atomic_write(output_dir / RECIPE, f"# Resolved recipe of this run (from {recipe.source}).\n" +
                 dump_recipe(recipe.raw))


def check_output_folder(run_dir: str | Path, out: str, overwrite: bool, example: str) -> Path:
    """An output folder for merge-export/export: never the run itself, never a file, never silently replaced."""
    target = Path(out).expanduser()
    if target.resolve() == Path(run_dir).resolve():
        raise UserError(f"--out {out} is the run directory itself; choose a new folder, e.g. {run_dir}/{example}")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite or choose another folder")
    return target


def write_folder_atomically(target: Path, fill) -> None:
    """`fill(staging)` writes into a staging folder beside `target`, which is then swapped in: readers never see
    a half-written folder, and a failure leaves the old one untouched."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

