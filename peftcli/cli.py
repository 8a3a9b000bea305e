"""The `peft` command line: one thin function per command; errors become one line and an exit code."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Annotated, Optional

import typer

from .errors import TrainingStopped, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient fine-tuning of Hugging Face models from YAML recipes.")

EXIT_UNEXPECTED = 1


def cli_errors(func):
    """UserError -> `error: ...` on stderr, exit 2. Anything else -> one line, exit 1 (PEFT_DEBUG=1 for the
    traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except TrainingStopped as exc:  # 3 interrupted + checkpointed, 4 NaN/inf loss, 5 out of memory
            typer.echo(f"stopped: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # the last line of defence: never a traceback unless asked for
            if os.environ.get("PEFT_DEBUG"):
                raise
            typer.echo(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]} "
                       f"(rerun with PEFT_DEBUG=1 for the traceback)", err=True)
            raise typer.Exit(EXIT_UNEXPECTED) from None

    return wrapper


def _setup_logging() -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("peftcli").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
@cli_errors
def train(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override: key.path=value (repeatable)")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="run directory (overrides train.output_dir)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the newest valid checkpoint of the run directory")] = False,
    resume_from: Annotated[Optional[str], typer.Option(help="continue from this checkpoint-N folder")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
):
    """Train RECIPE; prints where the run went."""
    from . import commands

    out = commands.train(recipe, set_ or [], output_dir, resume_from or resume, overwrite)
    typer.echo(f"run saved to {out}")


@app.command("eval")
@cli_errors
def eval_(
    run_dir: Annotated[str, typer.Argument(help="run directory made by `peft train`")],
    data: Annotated[Optional[str], typer.Option(help="evaluate on this data instead of the recipe's eval data")] = None,
    split: Annotated[str, typer.Option(help="eval | train: which of the recipe's splits")] = "eval",
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics as one JSON line last")] = False,
):
    """Score a trained run with its task's metrics."""
    from . import commands

    if split not in ("eval", "train"):
        raise UserError(f"--split {split!r}: use eval or train")
    metrics = commands.evaluate(run_dir, data, split)
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            typer.echo(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")


@app.command("merge-export")
@cli_errors
def merge_export(
    run_dir: Annotated[str, typer.Argument(help="run directory made by `peft train`")],
    out: Annotated[str, typer.Option(help="folder for the plain HF model")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 (merging itself is fp32)")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder")] = False,
):
    """Fold the method into the base weights and write a plain HF model."""
    from . import commands

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    target = commands.merge_export(run_dir, out, dtype, overwrite)
    typer.echo(f"merged model written to {target}")


@app.command()
@cli_errors
def validate(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override: key.path=value")] = None,
):
    """Check a recipe, its data and its method targets without loading weights."""
    from . import commands

    checked = commands.validate(recipe, set_ or [])
    labels = f", {len(checked.data.labels)} labels" if checked.data.labels else ""
    evals = len(checked.data.eval) if checked.data.eval is not None else 0
    typer.echo(f"ok: {recipe}: method {checked.recipe.method_name}, {len(checked.data.train)} train / "
               f"{evals} eval examples{labels}")


@app.command("glora-search")
@cli_errors
def glora_search(
    run_dir: Annotated[str, typer.Argument(help="a GLoRA supernet run (method.supernet: true)")],
    out: Annotated[str, typer.Option(help="recipe file to write with the chosen per-layer paths")],
    output_dir: Annotated[Optional[str], typer.Option(help="train.output_dir of that recipe")] = None,
    population: Annotated[int, typer.Option(min=2, help="candidates per generation")] = 10,
    generations: Annotated[int, typer.Option(min=1, help="generations of evolution")] = 5,
    mutation: Annotated[float, typer.Option(min=0.0, max=1.0, help="per-component mutation probability")] = 0.2,
    max_params: Annotated[Optional[int], typer.Option(min=1, help="parameter budget of the chosen paths")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="score on the first N eval rows")] = None,
    seed: Annotated[int, typer.Option(help="search random seed")] = 0,
):
    """Evolutionary search of per-layer GLoRA paths on a supernet run; writes a recipe to fine-tune them."""
    from .glora_search import SearchOptions, search

    result = search(run_dir, out, output_dir, SearchOptions(population, generations, mutation, max_params, limit,
                                                            seed))
    typer.echo(f"best {result['metric']} {result['score']:.4f} ({result['params']} params); "
               f"recipe written to {result['recipe']}")


@app.command()
@cli_errors
def methods(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False):
    """List the registered methods, their tasks and whether they merge."""
    from .commands import methods_table

    rows = methods_table()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        merge = "mergeable" if row["mergeable"] else "not mergeable"
        typer.echo(f"{row['name']:<18} {merge:<14} {row['summary']}  [{', '.join(row['tasks'])}]")


def main() -> None:
    _setup_logging()
    app()


if __name__ == "__main__":
    sys.exit(main())
