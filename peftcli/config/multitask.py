"""The recipe side of multi-task runs (`data.tasks`): each task's keys inherit the data section's, and what a
multi-task recipe cannot combine with."""
from __future__ import annotations

import dataclasses
import re

from .sections import DataSection, TaskDataSection
from .schema import Where
from .yamlio import LocDict

# data-level keys that act as every task's default (the others are single-task only or not per task)
INHERITED = ("eval_fraction", "format", "columns", "text", "text_pair", "label", "max_length", "limit")
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MACRO = "macro"


def inherit_defaults(section: dict, where: Where) -> dict:
    """The data mapping with each task's missing keys filled from the data level (line numbers kept)."""
    tasks = section["tasks"]
    out_tasks = LocDict()
    if isinstance(tasks, LocDict):
        out_tasks.lines, out_tasks.line = tasks.lines, tasks.line
    for name, task in tasks.items():
        if isinstance(task, dict):
            filled = LocDict({k: section[k] for k in INHERITED if k in section and k not in task})
            filled.update(task)
            if isinstance(task, LocDict):
                filled.lines = {**{k: section.lines.get(k) for k in filled if isinstance(section, LocDict)},
                                **task.lines}
                filled.line = task.line
            task = filled
        out_tasks[name] = task
    out = LocDict(section)
    if isinstance(section, LocDict):
        out.lines, out.line = section.lines, section.line
    out["tasks"] = out_tasks
    return out


def check_recipe(recipe, data: dict, root: Where) -> None:
    """What a multi-task recipe cannot combine with; every message names the key and the fix."""
    where = root.child("data", data)
    section = data["data"]
    for key in ("train", "eval"):
        if getattr(recipe.data, key) is not None:
            raise where.child(key, section).error(
                f"data.{key} and data.tasks exclude each other: move it under data.tasks.<name>.{key} "
                f"(or drop data.tasks for a single-task run)")
    tasks_where = where.child("tasks", section)
    if not recipe.data.tasks:
        raise tasks_where.error("is empty; list at least one task, e.g. tasks: {sst2: {train: ..., eval: ...}}")
    for name in recipe.data.tasks:
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or name == MACRO:
            raise tasks_where.error(f"task name {name!r}: use letters, digits, '_', '-' or '.' (it names metrics "
                                    f"and folders; '{MACRO}' is reserved for the average)")
    model_where = root.child("model", data)
    if recipe.model.task != "sequence-classification":
        raise model_where.child("task", data["model"]).error(
            f"data.tasks trains sequence-classification heads; '{recipe.model.task}' is single-task only")
    for key in ("labels", "num_labels"):
        if getattr(recipe.model, key) is not None:
            raise model_where.child(key, data["model"]).error(
                f"with data.tasks each task has its own; set data.tasks.<name>.{key} instead")
    if recipe.distill is not None:
        raise root.error("distill: the teacher has one head, a multi-task run one per task; drop distill or "
                         "data.tasks")


def as_data_section(task: TaskDataSection) -> DataSection:
    """The task's keys as a single-task data section, for the shared readers and tokenisers."""
    names = {f.name for f in dataclasses.fields(DataSection)} & {f.name for f in dataclasses.fields(TaskDataSection)}
    return DataSection(**{name: getattr(task, name) for name in names})
