"""Every shipped recipe validates (data read, labels inferred, method injected on the meta device)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftcli.cli import app

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(r.parents[1])) for r in RECIPES])
def test_recipe_validates(recipe, shared_data):
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok:")


def test_every_recipe_says_what_and_how():
    for recipe in RECIPES:
        head = recipe.read_text(encoding="utf-8").splitlines()[:6]
        assert head[0].startswith("#"), f"{recipe} must open with a comment saying what it trains"
        assert any("peft " in line for line in head if line.startswith("#")), f"{recipe}: give the command"
