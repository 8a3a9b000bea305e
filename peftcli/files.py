"""Files on disk shared by every layer: atomic writes, and the names of a run folder's files."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import UserError

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


def is_within(path: Path | str, folder: Path | str) -> bool:
    """`path` is `folder` or lies inside it, symlinks and `..` resolved (`runs/x/../x/a` is inside `runs/x`)."""
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return path == folder or folder in path.parents


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RECIPE).is_file() and (Path(path) / METHOD_JSON).is_file()


def read_record(run_dir: str | Path) -> dict:
    """method.json of a finished run (method, config, labels...), its format version checked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; pass a run directory made by `peft train`")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a finished peftcli run (no {RECIPE} + {METHOD_JSON}); "
                        f"pass the output_dir of `peft train`")
    record = json.loads((run_dir / METHOD_JSON).read_text(encoding="utf-8"))
    if record.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{run_dir / METHOD_JSON}: format version {record.get('format_version')} is not supported "
                        f"by this peftcli (expects {FORMAT_VERSION})")
    return record
