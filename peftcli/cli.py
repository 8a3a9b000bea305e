"""The `peft` command line: one thin function per command; errors become one line and an exit code."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import NothingToDo, TrainingStopped, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient fine-tuning of Hugging Face models from YAML recipes.")

EXIT_UNEXPECTED = 1


def cli_errors(func):
    """UserError -> `error: ...` on stderr, exit 2; NothingToDo -> its line, exit 0. Anything else -> one line,
    exit 1 (PEFT_DEBUG=1 for the traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except NothingToDo as exc:  # the work was already done (a finished run resumed): said, exit 0
            typer.echo(str(exc))
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
    """Train RECIPE; prints the final metrics, the plots, the time taken and where the run went."""
    from .workflows.plan import process_rank
    from .workflows.train import train as train_run

    out = train_run(recipe, set_ or [], output_dir, resume_from or resume, overwrite)
    if process_rank() == 0:  # only rank 0 wrote metrics.json and run_info.json
        from .runs.report import train_summary

        typer.echo("\n".join(train_summary(out)))
    typer.echo(f"run saved to {out}")


# Generation options shared by `peft eval` (causal-LM generation metrics) and `peft generate`.
MaxNewTokens = Annotated[Optional[int], typer.Option(min=1, help="tokens generated per prompt "
                                                                 "(default: the recipe's eval.max_new_tokens)")]
Sample = Annotated[bool, typer.Option("--sample/--greedy", help="sample instead of greedy decoding")]
Temperature = Annotated[float, typer.Option(min=0.01, help="sampling temperature")]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="sampling nucleus (top-p)")]
TopK = Annotated[int, typer.Option(min=0, help="sampling top-k (0: off)")]
Seed = Annotated[int, typer.Option(help="sampling seed")]
Checkpoint = Annotated[Optional[str], typer.Option(help="N (checkpoint-N of the run) or best")]
Base = Annotated[bool, typer.Option(help="TARGET is a recipe (or run): use its base model without the method")]


@app.command("eval")
@cli_errors
def eval_(
    target: Annotated[str, typer.Argument(help="run directory made by `peft train` (a recipe with --base)")],
    data: Annotated[Optional[str], typer.Option(help="evaluate on this data instead of the recipe's eval data")] = None,
    split: Annotated[str, typer.Option(help="eval | train: which of the recipe's splits")] = "eval",
    checkpoint: Checkpoint = None,
    base: Base = False,
    predictions: Annotated[Optional[str], typer.Option(help="write one JSON line per example here")] = None,
    report: Annotated[Optional[str], typer.Option(help="folder for metrics.json, per_class.json and "
                                                       "confusion_matrix.png")] = None,
    generate: Annotated[bool, typer.Option(help="causal LM: generate responses and score them")] = False,
    max_new_tokens: MaxNewTokens = None, sample: Sample = False, temperature: Temperature = 1.0, top_p: TopP = 1.0,
    top_k: TopK = 50, seed: Seed = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics as one JSON line last")] = False,
):
    """Score a run (its final weights, a checkpoint, or its base model) with its task's metrics."""
    from .models.generation import GenerationSettings
    from .workflows.evaluate import EvalOptions, evaluate

    if split not in ("eval", "train"):
        raise UserError(f"--split {split!r}: use eval or train")
    settings = GenerationSettings(max_new_tokens, sample, temperature, top_p, top_k, seed)
    metrics = evaluate(target, EvalOptions(data, split, checkpoint=checkpoint, base=base, predictions=predictions,
                                           report=report, generate=generate, settings=settings))
    if predictions:
        typer.echo(f"predictions written to {predictions}", err=as_json)
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            typer.echo(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")


@app.command()
@cli_errors
def generate(
    target: Annotated[str, typer.Argument(help="causal-LM run directory (a recipe with --base)")],
    prompt: Annotated[str, typer.Option(help="the user message (the chat template is applied when there is one)")],
    checkpoint: Checkpoint = None,
    base: Base = False,
    max_new_tokens: MaxNewTokens = None, sample: Sample = False, temperature: Temperature = 1.0, top_p: TopP = 1.0,
    top_k: TopK = 50, seed: Seed = 0,
):
    """Print a causal-LM run's completion of PROMPT."""
    from .models.generation import GenerationSettings
    from .workflows.generate import generate_text

    settings = GenerationSettings(max_new_tokens, sample, temperature, top_p, top_k, seed)
    typer.echo(generate_text(target, prompt, settings, base, checkpoint))


@app.command("merge-export")
@cli_errors
def merge_export(
    run_dir: Annotated[str, typer.Argument(help="run directory made by `peft train`")],
    out: Annotated[str, typer.Option(help="folder for the plain HF model")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 (merging itself is fp32)")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder")] = False,
):
    """Fold the method into the base weights and write a plain HF model."""
    from .workflows.merge_export import merge_export as merge

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    target = merge(run_dir, out, dtype, overwrite)
    typer.echo(f"merged model written to {target}")


@app.command()
@cli_errors
def export(
    run_dir: Annotated[str, typer.Argument(help="run directory made by `peft train`")],
    out: Annotated[str, typer.Option(help="folder for the exported adapter")],
    format_: Annotated[str, typer.Option("--format", help="peft: HF peft adapter folder (lora, ia3, vera) | "
                                                          "tensors: raw trained tensors + method.json (any method)")]
    = "peft",
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder")] = False,
):
    """Write a run's adapter for other tools: HF peft's layout, or its raw tensors."""
    from .runs.export import FORMATS, export as export_run

    if format_ not in FORMATS:
        raise UserError(f"--format {format_!r}: use {' or '.join(FORMATS)}")
    target = export_run(run_dir, out, format_, overwrite)
    typer.echo(f"{format_} adapter written to {target}")


@app.command()
@cli_errors
def validate(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override: key.path=value")] = None,
):
    """Check a recipe, its data and its method targets without loading weights."""
    from .workflows.plan import validate as validate_recipe

    checked = validate_recipe(recipe, set_ or [])
    labels = f", {len(checked.data.labels)} labels" if checked.data.labels else ""
    evals = len(checked.data.eval) if checked.data.eval is not None else 0
    if checked.tasks:  # multi-task: data.eval maps task -> examples
        evals = sum(len(t.eval or []) for t in checked.tasks)
        labels = "; tasks " + ", ".join(f"{t.name} ({len(t.train)} train, {t.num_labels} labels)"
                                        for t in checked.tasks)
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
    mutation: Annotated[float, typer.Option(min=0.0, max=1.0, help="per-component mutation probability")] = 0.1,
    max_params: Annotated[Optional[int], typer.Option(min=1, help="parameter budget of the chosen paths")] = None,
    search_rows: Annotated[int, typer.Option(min=1, help="score on N rows of the search split (sampled by --seed)")
                           ] = 1000,
    search_data: Annotated[Optional[str], typer.Option(
        help="search split file or glob; default: the train rows past the supernet's data.limit.train")] = None,
    seed: Annotated[int, typer.Option(help="search random seed")] = 0,
):
    """Evolutionary search of per-layer GLoRA paths and ranks on a supernet run, scored on a search split disjoint
    from data.eval; writes a recipe to fine-tune them."""
    from .workflows.glora_search import SearchOptions, search

    result = search(run_dir, out, output_dir, SearchOptions(population, generations, mutation, max_params,
                                                            search_rows, search_data, seed))
    typer.echo(f"best {result['metric']} {result['score']:.4f} on the search split ({result['search_split']}); "
               f"{result['params']} params; recipe written to {result['recipe']}")


@app.command()
@cli_errors
def methods(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False):
    """List the registered methods, their tasks and whether they merge."""
    # The catalogue as written from the registry (see methods/catalog.py): no torch import to list names.
    rows = json.loads((Path(__file__).parent / "methods" / "catalog.json").read_text(encoding="utf-8"))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        merge = "mergeable" if row["mergeable"] else "not mergeable"
        typer.echo(f"{row['name']:<18} {merge:<14} {row['summary']}  [{', '.join(row['tasks'])}]")


@app.command()
@cli_errors
def compare(
    run_dirs: Annotated[list[str], typer.Argument(help="finished run directories (seeds of one method are grouped)")],
    out: Annotated[Optional[str], typer.Option(help="write OUT.md, OUT.csv, OUT.json and OUT.png")] = None,
    metric: Annotated[Optional[str], typer.Option(help="metric to plot")] = None,
):
    """Compare finished runs: metric mean ± std over seeds, trainable parameters, time, throughput, memory."""
    from .runs.compare import compare as build

    typer.echo(build(run_dirs, out, metric), nl=False)


def main() -> None:
    _setup_logging()
    app()


if __name__ == "__main__":
    sys.exit(main())
