"""Recipes read with their method section validated against the method registry (the config layer's loader,
given this layer's METHODS)."""
from __future__ import annotations

from pathlib import Path

from ..config import recipe as config_recipe
from ..config.recipe import Recipe
from . import METHODS


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    return config_recipe.load_recipe(path, METHODS, overrides, output_dir)


def recipe_from_dict(data, source: str, recipe_dir: Path, overrides=(), output_dir=None) -> Recipe:
    return config_recipe.recipe_from_dict(data, source, recipe_dir, METHODS, overrides, output_dir)
