"""`peft generate`: one completion from a run, or from the recipe's base model with --base."""
from __future__ import annotations

from ..errors import UserError
from ..models.generation import GenerationSettings, generate, render_prompt
from .evaluate import load_target


def generate_text(target: str, prompt: str, settings: GenerationSettings, base: bool = False,
                  checkpoint: str | None = None) -> str:
    """`peft generate`: one completion of `prompt` from a run (or the recipe's base model with --base)."""
    loaded = load_target(target, base, checkpoint)
    if loaded.recipe.model.task != "causal-lm":
        raise UserError(f"{target}: generation needs a causal-lm run; this one is {loaded.recipe.model.task} "
                        f"(use `peft eval`)")
    return generate(loaded.model, loaded.tokenizer, [render_prompt(loaded.tokenizer, prompt)],
                    settings.for_recipe(loaded.recipe))[0]
