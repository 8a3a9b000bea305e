"""docs/RECIPE.md is what scripts/recipe_reference.py generates from the code, sections and keys included."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from peftcli.config.recipe import SECTIONS

from peftcli.config.sections import DistillSection, LayerDropSection

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recipe_reference.py"


def generator():
    spec = importlib.util.spec_from_file_location("recipe_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_md_is_up_to_date():
    module = generator()
    assert module.OUT.read_text(encoding="utf-8") == module.render(), \
        "docs/RECIPE.md is stale: run python scripts/recipe_reference.py"


def test_every_recipe_section_and_extra_key_is_documented():
    text = generator().render()
    for section in SECTIONS:
        assert f"## `{section}`" in text, section
    for cls in (LayerDropSection, DistillSection):
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in text, field.name
