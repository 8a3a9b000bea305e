"""`peft train`: recipe -> plan -> model -> trainer -> run folder, with resume, stops and the final report."""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
import time
from pathlib import Path

import torch

from ..config.recipe import Recipe
from ..data.collators import make_collator
from ..errors import NothingToDo, UserError
from ..files import METHOD_JSON, RECIPE, TENSORS, atomic_write, is_run_dir, is_within
from ..methods import get_method
from ..methods.install import prepare_model
from ..methods.recipes import load_recipe
from ..methods.tensors import save_trained
from ..models.loading import load_model
from ..run_lock import hold_run_lock
from ..runs.folder import load_teacher, method_record, write_recipe
from ..runs.outputs import foreign_entries, input_paths, is_previous_run
from ..runs.report import Stopwatch, model_card, plot_loss, run_info
from ..training import checkpoints as checkpoint
from ..training.crash_safety import TRAINER_STATE, finish_from_checkpoint, reached_the_end, train_with_stops
from ..training.distill import DistillCallback
from ..training.eval_settings import training_callbacks, training_eval_args
from ..training.layerdrop import LayerDropCallback
from ..training.metrics import make_compute_metrics
from ..training.trainer import JsonlLogCallback, PeftTrainer
from .evaluate import final_scores
from .plan import Plan, plan, process_rank

logger = logging.getLogger("peftcli")


def check_output_dir(recipe: Recipe) -> Path:
    """train.output_dir judged by its path alone: a folder of its own, apart from the recipe's inputs."""
    out = recipe.output_dir.expanduser()
    resolved = out.resolve()
    if resolved in (Path("/").resolve(), Path.home().resolve()):
        raise UserError(f"train.output_dir: {out} is / or your home directory; choose a run folder such as runs/x")
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir: {out} is a file; choose a directory")
    for source in input_paths(recipe):
        if source.is_dir() and is_within(out, source):
            raise UserError(f"train.output_dir: {out} is inside the input folder {source}; write runs elsewhere")
        if source == resolved:
            raise UserError(f"train.output_dir: {out} is an input file; choose a run folder such as runs/x")
        if is_within(source, out):  # --overwrite would delete it with the folder
            raise UserError(f"train.output_dir: {out} holds {source}, an input of this recipe; write runs elsewhere")
    return out


def check_existing_run(out: Path, resume, overwrite: bool) -> None:
    """A new run needs an empty folder; --overwrite replaces only a previous run, never other files."""
    # Other ranks of a multi-process run would see rank 0's first files: only rank 0 judges the folder.
    if resume or process_rank() != 0 or not (out.is_dir() and any(out.iterdir())):
        return
    if not is_previous_run(out):
        names = ", ".join(foreign_entries(out)[:3]) or f"no {RECIPE} written by peft train"
        raise UserError(f"train.output_dir: {out} holds files that are not a peftcli run ({names}); choose a new or "
                        f"empty folder with --output-dir")
    if not overwrite:
        raise UserError(f"train.output_dir: {out} already holds a previous run; pass --resume to continue it, "
                        f"--overwrite to replace it, or --output-dir to write elsewhere")


def train_command(recipe_path: str, overrides=(), output_dir: str | None = None) -> str:
    """`peft train` with the recipe, --set overrides and --output-dir of this run, quoted for a shell: the command
    whose recipe hashes like this one, so `... --resume` continues this run."""
    parts = ["peft", "train", recipe_path, *[arg for item in overrides for arg in ("--set", item)]]
    parts += ["--output-dir", output_dir] if output_dir else []
    return shlex.join(parts)


def train(recipe_path: str, overrides=(), output_dir: str | None = None, resume: bool | str = False,
          overwrite: bool = False) -> Path:
    """`resume`: False, True (newest valid checkpoint) or a checkpoint folder. The run folder's lock is held from
    before its first check to the last file written, so no other writer sees or changes it in between."""
    # run_info.json's "seconds": where the command's time went, not only the training loop; the total runs from
    # here (reading the recipe) to run_info.json, so Python start-up and imports before it are not in it.
    clock = Stopwatch()
    recipe = load_recipe(recipe_path, overrides, output_dir)
    absolutize_paths(recipe.raw)
    out = check_output_dir(recipe)
    command = train_command(recipe_path, overrides, output_dir)
    asked = " --resume" if resume is True else f" --resume-from {shlex.quote(str(resume))}" if resume else \
        " --overwrite" if overwrite else ""
    with hold_run_lock(out, command + asked):
        check_existing_run(out, resume, overwrite)
        recipe_hash = checkpoint.recipe_sha256(recipe.raw)
        resume_from = resume_start(out, resume, recipe_hash, recipe_path)
        return train_locked(recipe, out, resume_from, overwrite and not resume, command + " --resume", clock,
                            recipe_hash)


def resume_start(out: Path, resume, recipe_hash: str, recipe_path: str) -> Path | None:
    """The checkpoint `--resume [PATH]` continues from (None: step 0). A run of another recipe is never replaced;
    `--resume` of a finished run stops with NothingToDo, nothing written."""
    if not resume:
        return None
    same = same_recipe(out, recipe_hash)
    step = finished_step(out) if resume is True else None
    if step is not None and same is not False:
        raise NothingToDo(f"{out}: this run already finished at step {step} (its {TENSORS} and {METHOD_JSON} are "
                          f"there, no checkpoint is newer); nothing was changed. To train it again, drop --resume "
                          f"and pass --overwrite, or choose another --output-dir")
    resume_from = checkpoint.resume_point(out, resume, recipe_hash)
    if resume_from is None and same is False:
        raise UserError(f"--resume: {out} holds a run of another recipe than {recipe_path} (its {RECIPE} differs) "
                        f"and no checkpoint of this one; continue it with its own recipe ({out / RECIPE}) or "
                        f"choose another --output-dir")
    return resume_from


def same_recipe(out: Path, recipe_hash: str) -> bool | None:
    """Whether the run in `out` was trained from this recipe (its recipe.yaml, hashed as checkpoints are); None
    when `out` holds no recipe.yaml."""
    saved = out / RECIPE
    if not saved.is_file():
        return None
    try:
        raw = load_recipe(saved).raw
    except UserError:
        return False  # not readable as a recipe any more: not provably this one
    return checkpoint.recipe_sha256(raw) == recipe_hash


def finished_step(out: Path) -> int | None:
    """The step a finished run in `out` ended at: its tensors, method.json and recipe.yaml are there and no valid
    checkpoint is newer than its trainer_state.json. None when there is something to resume."""
    if not (is_run_dir(out) and (out / TENSORS).is_file()):
        return None
    state = out / TRAINER_STATE
    step = json.loads(state.read_text(encoding="utf-8")).get("global_step", 0) if state.is_file() else None
    latest = checkpoint.find_latest(out)
    if latest is None:
        return step or 0
    newest = (checkpoint.read_manifest(latest) or {}).get("step", 0)
    return step if step is not None and newest <= step else None


def train_locked(recipe: Recipe, out: Path, resume_from: Path | None, replace: bool, resume_command: str,
                 clock, recipe_hash: str) -> Path:
    """The run itself, once the folder is locked and judged; `replace`: delete the previous run in `out` first."""
    clock.start("prepare_data")  # read + tokenise, and the method checked on the meta-device skeleton
    the_plan = plan(recipe)
    clock.start("load_model")  # weights, method injection, trainer set-up
    from transformers import set_seed

    set_seed(recipe.train.get("seed", 42))
    model = load_model(recipe.model, the_plan.num_labels, the_plan.data.labels)
    model = prepare_model(model, recipe.method_name, recipe.method, recipe.share_across_layers, the_plan.tasks,
                          head=recipe.model.head)
    if recipe.data.packing:  # with a KV cache transformers ignores packed position_ids: examples would mix
        model.config.use_cache = False
    if replace and out.exists() and process_rank() == 0:
        shutil.rmtree(out)  # check_existing_run found a previous run there, and the lock has kept it so
    out.mkdir(parents=True, exist_ok=True)
    if process_rank() == 0:
        write_recipe(recipe, out)
    record = method_record(recipe, model, the_plan.data.labels)
    if the_plan.tasks:
        record["tasks"] = [task.record() for task in the_plan.tasks]
    trainer = build_trainer(the_plan, model, out, record, recipe_sha256=recipe_hash)
    for callback in recipe_callbacks(recipe, model, the_plan.data.labels):  # layerdrop, distill
        trainer.add_callback(callback)
    clock.start("train")
    started = time.time()
    if resume_from is not None and reached_the_end(resume_from):
        finish_from_checkpoint(trainer, resume_from)  # the last step is done: training again would add one
    else:
        train_with_stops(trainer, resume_from, resume_command, recipe.data.max_length)
    seconds = time.time() - started
    clock.start("save_and_evaluate")
    # A collective under FSDP / ZeRO-3 (every rank calls); DeepSpeed gathers through its engine, not the module.
    gathered = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
    if trainer.is_world_process_zero():
        save_trained(trainer.accelerator.unwrap_model(trainer.model), out, record, gathered)
    metrics = final_scores(trainer, the_plan, report_dir=out) if the_plan.data.eval else {}
    finish_run(trainer, recipe, record, metrics, seconds, out, clock)
    return out


def build_trainer(the_plan: Plan, model, out: Path, record: dict, recipe_sha256: str = "", **extra_args):
    from transformers import TrainingArguments

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
    task_options = {}
    if the_plan.tasks:  # single-task batches and per-task metrics (training/multitask.py)
        task_options = {"tasks": the_plan.tasks, "sampling": recipe.data.sampling,
                        "sampling_temperature": recipe.data.sampling_temperature}
    trainer = PeftTrainer(
        model=model, args=args, train_dataset=the_plan.data.train, eval_dataset=the_plan.data.eval,
        data_collator=make_collator(recipe.model.task, the_plan.tokenizer, packing=recipe.data.packing,
                                    boundaries=recipe.model.attn_implementation == "varlen"),
        processing_class=the_plan.tokenizer,
        compute_metrics=None if the_plan.tasks else make_compute_metrics(
            recipe.model.task, the_plan.metrics, the_plan.num_labels, the_plan.data.labels),
        callbacks=callbacks, optim_rules=recipe.optim, recipe_sha256=recipe_sha256,
        chunked_loss=recipe.model.task == "causal-lm" and recipe.model.chunked_loss and recipe.distill is None,
        save_trained=lambda m, d, gathered=None: save_trained(m, d, record, gathered), **task_options)
    if recipe.model.task != "causal-lm":
        # HF classification heads take **kwargs but return a per-process mean loss that ignores
        # num_items_in_batch; left True, the Trainer would multiply it by the number of processes (DDP: x2 loss).
        trainer.model_accepts_loss_kwargs = False
    return trainer


def finish_run(trainer, recipe: Recipe, record: dict, metrics: dict, seconds: float, out: Path, clock) -> None:
    if not trainer.is_world_process_zero():
        return
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write(out / "trainer_state.json", json.dumps(dataclasses.asdict(trainer.state), indent=2, default=str))
    plot_loss(trainer.state.log_history, out / "loss.png")
    info = run_info(trainer.state.log_history, seconds, len(trainer.train_dataset), clock.seconds())
    atomic_write(out / "run_info.json", json.dumps(info, indent=2))
    atomic_write(out / "README.md", model_card(recipe.raw, record, metrics, seconds))


def recipe_callbacks(recipe, model, labels: list[str] | None) -> list:
    """The recipe-level sections that combine with any method (layerdrop, distill); `peft train` only:
    evaluation never loads a teacher or drops layers."""
    callbacks = []
    if recipe.layerdrop is not None and recipe.layerdrop.rate > 0:
        callbacks.append(LayerDropCallback(model, recipe.layerdrop))
    if recipe.distill is not None:
        callbacks.append(DistillCallback(model, load_teacher(recipe.distill, recipe, labels), recipe.distill))
    return callbacks


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
