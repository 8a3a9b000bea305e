"""The method catalogue as data (`peft methods`): each method's summary, tasks, paper and options."""
from __future__ import annotations

import dataclasses

from . import METHODS


def methods_table() -> list[dict]:
    rows = []
    for method in METHODS.values():
        options = {f.name: {"default": _default(f), "doc": f.metadata.get("doc", "")}
                   for f in dataclasses.fields(method.config_cls)}
        rows.append({"name": method.name, "summary": method.summary, "tasks": sorted(method.tasks),
                     "mergeable": method.mergeable, "paper": method.paper, "options": options})
    return rows


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None
