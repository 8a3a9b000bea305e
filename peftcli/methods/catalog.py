"""The method catalogue as data (`peft methods`): each method's summary, tasks, paper and options.

`peft methods` answers from catalog.json beside this file, written from the registry by
`python -m peftcli.methods.catalog` (tests/test_catalog.py keeps the two equal): listing the methods then needs
neither torch nor transformers, which take seconds to import."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import METHODS

CATALOG = Path(__file__).with_name("catalog.json")


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


def catalog_text() -> str:
    return json.dumps(methods_table(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    CATALOG.write_text(catalog_text(), encoding="utf-8")
    print(f"wrote {CATALOG}")
