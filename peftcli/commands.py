"""The workflows behind the CLI, top to bottom: train, evaluate, merge_export, validate, methods_table."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from . import runs
from .data import load_splits
from .errors import UserError
from .extras import recipe_callbacks
from .methods import METHODS, get_method
from .metrics import DEFAULT_METRICS, check_metrics, make_compute_metrics
from .recipe import Recipe, load_recipe
from .tasks import Prepared, make_collator, prepare
from .training_eval import check_training_eval, training_callbacks, training_eval_args

logger = logging.getLogger("peftcli")


@dataclasses.dataclass
class Plan:
    """Everything validated before a single weight is loaded."""

    recipe: Recipe
    tokenizer: object
    data: Prepared
    num_labels: int | None
    metrics: list[str]
    tasks: list | None = None  # multi-task runs (data.tasks): multitask.TaskInfo per task, in recipe order


def plan(recipe: Recipe) -> Plan:
    """Read and tokenise the data, infer labels, and check the method against the model's architecture
    (built on the meta device, so no weights are read)."""
    from .models import build_skeleton, load_tokenizer

    if recipe.data.tasks:
        from .multitask import plan_tasks

        return plan_tasks(recipe)
    tokenizer = load_tokenizer(recipe.model)
    train_rows, eval_rows = load_splits(recipe.data, recipe.train.get("seed", 42))
    data = prepare(recipe.model.task, tokenizer, recipe.data, recipe.model, train_rows, eval_rows)
    for reason, count in data.dropped.items():
        logger.warning("dropped %d rows: %s", count, reason)
    check_enough_rows(recipe, len(data.train))
    num_labels = len(data.labels) if data.labels else (1 if recipe.model.num_labels == 1 else None)
    regression = num_labels == 1
    default_key = "regression" if regression else recipe.model.task
    metrics = recipe.eval.metrics or DEFAULT_METRICS[default_key]
    check_metrics(metrics, recipe.model.task, regression)
    check_training_eval(recipe, metrics, data.labels, data.eval is not None)
    skeleton = build_skeleton(recipe.model, num_labels, data.labels)
    runs.prepare_model(skeleton, recipe.method_name, recipe.method, recipe.share_across_layers)
    return Plan(recipe, tokenizer, data, num_labels, metrics)


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun / accelerate launch


def check_enough_rows(recipe: Recipe, rows: int) -> None:
    from .checkpoint import world_size

    batch = (recipe.train.get("per_device_train_batch_size", 8) * recipe.train.get("gradient_accumulation_steps", 1)
             * world_size())
    if rows < batch:
        raise UserError(f"data.train: {rows} examples are fewer than one global batch of {batch} (batch size x "
                        f"gradient_accumulation_steps x processes); add data or lower "
                        f"train.per_device_train_batch_size")


def check_output_dir(recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    out = recipe.output_dir.expanduser()
    resolved = out.resolve()
    if resolved in (Path("/").resolve(), Path.home().resolve()):
        raise UserError(f"train.output_dir: {out} is / or your home directory; choose a run folder such as runs/x")
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir: {out} is a file; choose a directory")
    tasks = (recipe.data.tasks or {}).values()
    for source in filter(None, [recipe.model.name_or_path, recipe.data.train, recipe.data.eval,
                                *[path for task in tasks for path in (task.train, task.eval)]]):
        src = Path(source).expanduser()
        if src.is_dir() and (resolved == src.resolve() or src.resolve() in resolved.parents):
            raise UserError(f"train.output_dir: {out} is inside the input folder {src}; write runs elsewhere")
        if src.is_file() and resolved == src.resolve():
            raise UserError(f"train.output_dir: {out} is an input file; choose a run folder such as runs/x")
    # Other ranks of a multi-process run would see rank 0's first files: only rank 0 judges the folder.
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite) and process_rank() == 0:
        kind = "a previous run" if runs.is_run_dir(out) else "files that are not a peftcli run"
        raise UserError(f"train.output_dir: {out} already holds {kind}; pass --resume to continue it, "
                        f"--overwrite to replace it, or --output-dir to write elsewhere")
    return out


def train(recipe_path: str, overrides=(), output_dir: str | None = None, resume: bool | str = False,
          overwrite: bool = False) -> Path:
    """`resume`: False, True (newest valid checkpoint) or a checkpoint folder."""
    from . import checkpoint
    from .report import Stopwatch
    from .resilience import train_with_stops

    # run_info.json's "seconds": where the command's time went, not only the training loop; the total runs from
    # here (reading the recipe) to run_info.json, so Python start-up and imports before it are not in it.
    clock = Stopwatch()
    recipe = load_recipe(recipe_path, overrides, output_dir)
    absolutize_paths(recipe.raw)
    out = check_output_dir(recipe, resume, overwrite)
    recipe_hash = checkpoint.recipe_sha256(recipe.raw)
    resume_from = checkpoint.resume_point(out, resume, recipe_hash)
    clock.start("prepare_data")  # read + tokenise, and the method checked on the meta-device skeleton
    the_plan = plan(recipe)
    clock.start("load_model")  # weights, method injection, trainer set-up
    from transformers import set_seed

    set_seed(recipe.train.get("seed", 42))
    from .models import load_model

    if the_plan.tasks:
        from .multitask import load_task_model

        model = load_task_model(recipe, the_plan.tasks)
    else:
        model = load_model(recipe.model, the_plan.num_labels, the_plan.data.labels)
        model = runs.prepare_model(model, recipe.method_name, recipe.method, recipe.share_across_layers)
    if recipe.data.packing:  # with a KV cache transformers ignores packed position_ids: examples would mix
        model.config.use_cache = False
    if overwrite and out.exists() and not resume and process_rank() == 0:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if process_rank() == 0:
        runs.write_recipe(recipe, out)
    record = runs.method_record(recipe, model, the_plan.data.labels)
    if the_plan.tasks:
        record["tasks"] = [task.record() for task in the_plan.tasks]
    trainer = build_trainer(the_plan, model, out, record, recipe_sha256=recipe_hash)
    for callback in recipe_callbacks(recipe, model, the_plan.data.labels):  # layerdrop, distill
        trainer.add_callback(callback)
    clock.start("train")
    started = time.time()
    resume_command = f"peft train {recipe_path} --resume" + (f" --output-dir {output_dir}" if output_dir else "")
    train_with_stops(trainer, resume_from, resume_command, recipe.data.max_length)
    seconds = time.time() - started
    clock.start("save_and_evaluate")
    # A collective under FSDP / ZeRO-3 (every rank calls); DeepSpeed gathers through its engine, not the module.
    gathered = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
    if trainer.is_world_process_zero():
        runs.save_trained(trainer.accelerator.unwrap_model(trainer.model), out, record, gathered)
    metrics = final_metrics(trainer, the_plan, report_dir=out) if the_plan.data.eval else {}
    finish_run(trainer, recipe, record, metrics, seconds, out, clock)
    return out


def build_trainer(the_plan: Plan, model, out: Path, record: dict, recipe_sha256: str = "", **extra_args):
    from transformers import TrainingArguments

    from .trainer import JsonlLogCallback, PeftTrainer

    recipe = the_plan.recipe
    kwargs = {"report_to": "none", "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no",
              "per_device_eval_batch_size": recipe.eval.batch_size, "remove_unused_columns": False,
              "label_names": ["labels"], "dataloader_num_workers": 0,
              "dataloader_pin_memory": torch.cuda.is_available(), **recipe.train,
              **training_eval_args(recipe), **extra_args}
    kwargs["output_dir"] = str(out)
    args = TrainingArguments(**kwargs)
    method = get_method(recipe.method_name)
    callbacks = [JsonlLogCallback(str(out / "log.jsonl"))]
    if method.callbacks:
        callbacks += method.callbacks(recipe.method, model)
    callbacks += training_callbacks(recipe)
    trainer_cls, task_options = PeftTrainer, {}
    if the_plan.tasks:  # single-task batches, per-task heads and metrics (multitask.py)
        from .multitask import make_trainer_class, trainer_options

        trainer_cls, task_options = make_trainer_class(), trainer_options(the_plan)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=the_plan.data.train, eval_dataset=the_plan.data.eval,
        data_collator=make_collator(recipe.model.task, the_plan.tokenizer, packing=recipe.data.packing,
                                    boundaries=recipe.model.attn_implementation == "varlen"),
        processing_class=the_plan.tokenizer,
        compute_metrics=None if the_plan.tasks else make_compute_metrics(
            recipe.model.task, the_plan.metrics, the_plan.num_labels, the_plan.data.labels),
        callbacks=callbacks, optim_rules=recipe.optim, recipe_sha256=recipe_sha256,
        chunked_loss=recipe.model.task == "causal-lm" and recipe.model.chunked_loss and recipe.distill is None,
        save_trained=lambda m, d, gathered=None: runs.save_trained(m, d, record, gathered), **task_options)
    if recipe.model.task != "causal-lm":
        # HF classification heads take **kwargs but return a per-process mean loss that ignores
        # num_items_in_batch; left True, the Trainer would multiply it by the number of processes (DDP: x2 loss).
        trainer.model_accepts_loss_kwargs = False
    return trainer


def final_metrics(trainer, the_plan: Plan, report_dir: Path | None = None) -> dict:
    """The recipe's metrics on its eval data; with report_dir, per_class.json + confusion_matrix.png there."""
    from .evaluation import final_scores

    if the_plan.tasks:
        from .multitask import final_scores as task_scores

        return task_scores(trainer, the_plan, report_dir)
    return final_scores(trainer, the_plan, report_dir)


def finish_run(trainer, recipe: Recipe, record: dict, metrics: dict, seconds: float, out: Path, clock) -> None:
    from .report import model_card, plot_loss, run_info

    if not trainer.is_world_process_zero():
        return
    runs.atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    runs.atomic_write(out / "trainer_state.json", json.dumps(dataclasses.asdict(trainer.state), indent=2,
                                                             default=str))
    plot_loss(trainer.state.log_history, out / "loss.png")
    info = run_info(trainer.state.log_history, seconds, len(trainer.train_dataset), clock.seconds())
    runs.atomic_write(out / "run_info.json", json.dumps(info, indent=2))
    runs.atomic_write(out / "README.md", model_card(recipe.raw, record, metrics, seconds))


def evaluate(run_dir: str, data: str | None = None, split: str = "eval", **options) -> dict:
    """Metrics of a run (see evaluation.EvalOptions for checkpoints, --base, predictions and generation)."""
    from .evaluation import EvalOptions, evaluate as evaluate_target

    return evaluate_target(run_dir, EvalOptions(data=data, split=split, **options))


def merge_export(run_dir: str, out: str, dtype: str = "float32", overwrite: bool = False) -> Path:
    recipe, record = runs.read_run(run_dir)
    if record.get("tasks"):
        from .multitask import merge_export as merge_tasks

        return merge_tasks(run_dir, out, dtype, overwrite)
    method = get_method(record["method"])
    if not method.mergeable:
        raise UserError(f"method '{method.name}' cannot be merged into the base weights: {method.merge_hint} "
                        f"(use the run directory itself with `peft eval {run_dir}`)")
    target = runs.check_output_folder(run_dir, out, overwrite, "merged")
    _, _, model, tokenizer = runs.load_trained(run_dir)
    model = method.merge(model, recipe.method)
    check_finite(model)
    model = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    runs.write_folder_atomically(target, fill)
    return target


def check_finite(model) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"merged weight {name} contains NaN/inf; the run diverged, nothing was written")


def validate(recipe_path: str, overrides=()) -> Plan:
    return plan(load_recipe(recipe_path, overrides))


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


def absolutize_paths(raw: dict) -> None:
    """Make local model/data paths absolute in the saved recipe, so a run directory works from anywhere."""
    model = raw.get("model", {})
    path = model.get("name_or_path", "")
    if path and not path.startswith("pkg:") and Path(path).expanduser().exists():
        model["name_or_path"] = str(Path(path).expanduser().resolve())
    data = raw.get("data", {})
    for section in [data, *(data.get("tasks") or {}).values()]:
        for key in ("train", "eval"):
            value = section.get(key)
            if value and not value.startswith("hub:") and not any(c in value for c in "*?[") and \
                    Path(value).exists():
                section[key] = str(Path(value).resolve())
