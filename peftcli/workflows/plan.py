"""The plan of a run: everything `peft train` and `peft validate` check before a single weight is loaded."""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from ..config.recipe import Recipe
from ..data.multitask import read_task
from ..data.prepare import Prepared, prepare
from ..data.readers import load_splits
from ..errors import UserError
from ..methods.install import prepare_model
from ..methods.recipes import load_recipe
from ..models.loading import build_skeleton, load_tokenizer
from ..training.checkpoints import world_size
from ..training.eval_settings import check_training_eval
from ..training.metrics import DEFAULT_METRICS, check_metrics
from ..training.multitask import MACRO_SCORE, check_training_eval as check_tasks_eval, choose_metrics

logger = logging.getLogger("peftcli")


@dataclasses.dataclass
class Plan:
    """Everything validated before a single weight is loaded."""

    recipe: Recipe
    tokenizer: object
    data: Prepared
    num_labels: int | None
    metrics: list[str]
    tasks: list | None = None  # multi-task runs (data.tasks): data.multitask.TaskInfo per task, in recipe order


def plan(recipe: Recipe) -> Plan:
    """Read and tokenise the data, infer labels, and check the method against the model's architecture
    (built on the meta device, so no weights are read)."""
    tokenizer = load_tokenizer(recipe.model)
    if recipe.data.tasks:
        return plan_tasks(recipe, tokenizer)
    started = time.perf_counter()
    train_rows, eval_rows = load_splits(recipe.data, recipe.train.get("seed", 42))
    say(f"data: read {len(train_rows):,} train rows" + (f" and {len(eval_rows):,} eval rows" if eval_rows else "")
        + f" in {time.perf_counter() - started:.1f} s; tokenising...")
    started = time.perf_counter()
    data = prepare(recipe.model.task, tokenizer, recipe.data, recipe.model, train_rows, eval_rows)
    say(f"data: tokenised in {time.perf_counter() - started:.1f} s")
    for reason, count in data.dropped.items():
        logger.warning("dropped %d rows: %s", count, reason)
    check_enough_rows(recipe, len(data.train))
    num_labels = len(data.labels) if data.labels else (1 if recipe.model.num_labels == 1 else None)
    regression = num_labels == 1
    default_key = "regression" if regression else recipe.model.task
    metrics = recipe.eval.metrics or DEFAULT_METRICS[default_key]
    check_metrics(metrics, recipe.model.task, regression, recipe.eval.trust_metric_code)
    check_training_eval(recipe, metrics, data.labels, data.eval is not None)
    skeleton = build_skeleton(recipe.model, num_labels, data.labels)
    prepare_model(skeleton, recipe.method_name, recipe.method, recipe.share_across_layers, head=recipe.model.head)
    return Plan(recipe, tokenizer, data, num_labels, metrics)


def say(message: str) -> None:
    """A progress line while data is read (large files take minutes), from one process of a multi-GPU job."""
    if process_rank() == 0:
        logger.info(message)


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun / accelerate launch


def check_enough_rows(recipe: Recipe, rows: int) -> None:
    batch = (recipe.train.get("per_device_train_batch_size", 8) * recipe.train.get("gradient_accumulation_steps", 1)
             * world_size())
    if rows < batch:
        raise UserError(f"data.train: {rows} examples are fewer than one global batch of {batch} (batch size x "
                        f"gradient_accumulation_steps x processes); add data or lower "
                        f"train.per_device_train_batch_size")


def plan_tasks(recipe: Recipe, tokenizer) -> Plan:
    """The plan of a multi-task recipe: every task's data read, tokenised and labelled; heads and method checked
    on the meta-device skeleton."""
    tasks = []
    for index, name in enumerate(recipe.data.tasks):
        tasks.append(read_task(recipe, tokenizer, name, index))
        tasks[-1].metrics = choose_metrics(recipe, tasks[-1])
    train = [f for t in tasks for f in t.train]
    check_enough_rows(recipe, len(train))
    evals = {t.name: t.eval for t in tasks if t.eval is not None}
    check_tasks_eval(recipe, tasks, bool(evals))
    prepare_model(build_skeleton(recipe.model), recipe.method_name, recipe.method, recipe.share_across_layers, tasks,
                  head=recipe.model.head)
    return Plan(recipe, tokenizer, Prepared(train, evals or None, None, {}), None, [MACRO_SCORE], tasks)


def validate(recipe_path: str, overrides=()) -> Plan:
    return plan(load_recipe(recipe_path, overrides))
