"""Recipe-level training features that combine with any method: the `layerdrop` and `distill` sections."""
from __future__ import annotations


def recipe_callbacks(recipe, model, labels: list[str] | None) -> list:
    """Callbacks for `peft train` only (evaluation never loads a teacher or drops layers)."""
    callbacks = []
    if recipe.layerdrop is not None and recipe.layerdrop.rate > 0:
        from .layerdrop import LayerDropCallback

        callbacks.append(LayerDropCallback(model, recipe.layerdrop))
    if recipe.distill is not None:
        from .distill import DistillCallback, load_teacher

        callbacks.append(DistillCallback(model, load_teacher(recipe.distill, recipe, labels), recipe.distill))
    return callbacks
