"""`peft merge-export`: the method folded into the base weights, written as a plain HF model (one per task for a
multi-task run), or a clear refusal for methods that cannot be merged."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.multitask import tasks_from_record
from ..errors import UserError
from ..files import atomic_write, write_folder_atomically
from ..methods import get_method
from ..models.heads import head_name, set_labels
from ..models.loading import refuse_unmergeable_pooling
from ..runs.folder import check_output_folder, load_trained, read_run
from ..run_lock import hold_run_lock

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_export(run_dir: str, out: str, dtype: str = "float32", overwrite: bool = False) -> Path:
    """A multi-task run writes OUT/<task>/ per task (the backbone with the method folded in plus that task's head
    as the model's own head, config labels set) and OUT/tasks.json listing them. OUT is locked from its check to
    its last write, so two exports into one folder never interleave."""
    with hold_run_lock(Path(out).expanduser(), f"peft merge-export {run_dir} --out {out}", "--out"):
        return _merge_export(run_dir, out, dtype, overwrite)


def _merge_export(run_dir: str, out: str, dtype: str, overwrite: bool) -> Path:
    recipe, record = read_run(run_dir)
    method = get_method(record["method"])
    if not method.mergeable:
        raise UserError(f"method '{method.name}' cannot be merged into the base weights: {method.merge_hint} "
                        f"(use the run directory itself with `peft eval {run_dir}`)")
    refuse_unmergeable_pooling(recipe.model, "peft merge-export")
    target = check_output_folder(run_dir, out, overwrite, "merged")
    _, _, model, tokenizer = load_trained(run_dir)
    tasks = tasks_from_record(record) if record.get("tasks") else None
    name = head_name(model) if tasks else None
    heads = getattr(model, name) if tasks else None
    model = method.merge(model, recipe.method)
    check_finite(model)
    model = model.to(DTYPES[dtype])
    if not tasks:
        write_folder_atomically(target, lambda staging: save_model(model, tokenizer, staging))
        return target
    for hook in heads.hooks:  # the routing: each exported model has a single head
        hook.remove()

    def fill(staging: Path) -> None:
        for task in tasks:
            setattr(model, name, heads.heads[task.name])
            set_labels(model.config, task)
            save_model(model, tokenizer, staging / task.name)
        listing = {t.name: {"folder": t.name, "labels": t.labels, "num_labels": t.num_labels} for t in tasks}
        atomic_write(staging / "tasks.json", json.dumps(listing, indent=2))

    write_folder_atomically(target, fill)
    return target


def save_model(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_finite(model) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"merged weight {name} contains NaN/inf; the run diverged, nothing was written")
