"""The run directory: its record, its recipe, and the trained model rebuilt from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..config.recipe import Recipe, dump_recipe
from ..data.multitask import tasks_from_record
from ..errors import UserError
from ..files import FORMAT_VERSION, RECIPE, TENSORS, atomic_write, is_run_dir, is_within, read_record
from ..methods.install import prepare_model
from ..methods.recipes import load_recipe
from ..methods.tensors import load_tensors_into
from ..models.heads import trained_head
from ..models.loading import load_model, load_tokenizer, pooling_of
from ..training.layerdrop import prune_layers
from .outputs import input_paths, is_export_output, run_entry_of


def method_record(recipe: Recipe, model: torch.nn.Module, labels: list[str] | None) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"format_version": FORMAT_VERSION, "method": recipe.method_name,
            "config": dataclasses.asdict(recipe.method), "task": recipe.model.task,
            "base_model": recipe.model.name_or_path, "labels": labels,
            "num_labels": recipe.model.num_labels if labels is None else len(labels),
            "trainable_params": trainable, "total_params": total, "head": trained_head(model),
            **({"pooling": pooling_of(recipe.model)} if recipe.model.task == "sequence-classification" else {}),
            **({"share_across_layers": True} if recipe.share_across_layers else {})}


def read_run(run_dir: str | Path) -> tuple[Recipe, dict]:
    record = read_record(run_dir)  # checks the folder first: a clear error when it is not a run
    return load_recipe(Path(run_dir) / RECIPE), record


def load_trained(run_dir: str | Path, weights_dir: str | Path | None = None):
    """(recipe, record, model with trained tensors, tokenizer) from a run directory (or one of its checkpoints)."""
    recipe, record = read_run(run_dir)
    weights_dir = Path(weights_dir or run_dir)
    tasks = tasks_from_record(record) if record.get("tasks") else None
    model = load_model(recipe.model, None if tasks else record.get("num_labels"), None if tasks else record.get("labels"))
    model = prepare_model(model, recipe.method_name, recipe.method, recipe.share_across_layers, tasks,
                          head=recipe.model.head)
    load_tensors_into(model, weights_dir / TENSORS)
    if recipe.layerdrop is not None and recipe.layerdrop.prune_layers:
        model = prune_layers(model, recipe.layerdrop)  # the inference-time form of a LayerDrop-trained run
    model.eval()
    return recipe, record, model, load_tokenizer(recipe.model)


def write_recipe(recipe: Recipe, output_dir: Path) -> None:
    atomic_write(output_dir / RECIPE, f"# Resolved recipe of this run (from {recipe.source}).\n" +
                 dump_recipe(recipe.raw))


def check_output_folder(run_dir: str | Path, out: str, overwrite: bool, example: str) -> Path:
    """An output folder for merge-export/export: never the run itself, one of its entries or a folder holding it,
    never a file, apart from the run's inputs, and replaced (--overwrite) only when an earlier export made it."""
    target = Path(out).expanduser()
    if target.resolve() == Path(run_dir).resolve():
        raise UserError(f"--out {out} is the run directory itself; choose a new folder, e.g. {run_dir}/{example}")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    _check_apart(run_dir, out, target, example)
    if target.exists() and any(target.iterdir()):
        _check_replaceable(run_dir, out, target, overwrite)
    return target


def _check_apart(run_dir: str | Path, out: str, target: Path, example: str) -> None:
    """Writing (and with --overwrite, deleting) `target` must not touch the run or what it was trained from."""
    if is_within(run_dir, target):
        raise UserError(f"--out {out} holds the run directory {run_dir}; choose a folder outside it")
    entry = run_entry_of(run_dir, target)
    if entry:
        raise UserError(f"--out {out} lies inside the run's own {entry}; choose a new folder, e.g. {run_dir}/{example}")
    recipe, _ = read_run(run_dir)
    for source in input_paths(recipe):
        if is_within(target, source) or is_within(source, target):
            raise UserError(f"--out {out} overlaps {source}, an input of the run (its base model or data); choose a "
                            f"folder apart from them")


def _check_replaceable(run_dir: str | Path, out: str, target: Path, overwrite: bool) -> None:
    previous = is_export_output(target)
    if not overwrite:
        fix = "pass --overwrite to replace it or choose another folder" if previous else \
            "choose a new or empty folder (--overwrite replaces only an earlier export or merge-export)"
        raise UserError(f"--out {out} exists and is not empty; {fix}")
    if is_within(target, run_dir):  # a checkpoint there holds the same kinds of files as an export
        raise UserError(f"--out {out} is inside the run directory, where --overwrite deletes nothing; remove it "
                        f"yourself or choose a folder outside the run")
    if not previous:
        names = ", ".join(sorted(p.name for p in target.iterdir())[:3])
        raise UserError(f"--out {out} holds files that no export or merge-export writes ({names}); --overwrite "
                        f"replaces only such a folder: choose another folder")


def load_teacher(cfg, recipe, labels: list[str] | None) -> nn.Module:
    """The teacher: a finished peftcli run directory (its trained method included) or a plain model path."""
    path = Path(cfg.teacher).expanduser()
    if path.is_dir() and is_run_dir(path):
        _, record, teacher, _ = load_trained(path)
        if labels is not None and record.get("labels") not in (None, labels):
            raise UserError(f"distill.teacher: {path} was trained on labels {record.get('labels')}, the student on "
                            f"{labels}; distil between runs of the same label set")
    else:
        section = dataclasses.replace(recipe.model, name_or_path=cfg.teacher)
        teacher = load_model(section, len(labels) if labels else None, labels)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
