"""`peft eval`: scoring a run, one of its checkpoints or the base model; predictions, reports, generation metrics.
The same path scores single-task and multi-task runs (each task on its own rows, then the averages)."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ..config.recipe import Recipe

from ..config.sections import DataSection
from ..data.collators import make_collator
from ..data.multitask import eval_rows as task_eval_rows, task_features, tasks_from_record
from ..data.prepare import prepare
from ..data.readers import load_splits
from ..errors import UserError
from ..files import RECIPE, TENSORS, atomic_write, is_run_dir, is_within
from ..methods.recipes import load_recipe
from ..models.generation import GenerationSettings, generate, prompt_reference_pairs
from ..models.heads import add_task_heads, install_routing, task_heads
from ..models.loading import load_model
from ..run_lock import hold_run_lock
from ..runs.eval_report import CONFUSION, PER_CLASS, labels_report, write_predictions, write_report
from ..runs.folder import load_trained, read_run
from ..runs.outputs import input_paths, run_entry_of
from ..training import checkpoints
from ..training.metrics import DEFAULT_METRICS, NOT_METRICS, lm_metrics, make_compute_metrics, tag_sequences
from ..training.multitask import combine, logits_of, predict_tasks
from ..training.text_metrics import (EVALUATE_PREFIX, GENERATION, check_metrics_code, evaluate_metric,
                                     generation_metrics)
from .plan import plan


@dataclasses.dataclass
class Loaded:
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: object
    labels: list[str] | None
    num_labels: int | None
    tasks: list | None = None  # multi-task runs: data.multitask.TaskInfo per task


@dataclasses.dataclass
class EvalOptions:
    data: str | None = None        # score this file instead of the recipe's eval data
    split: str = "eval"            # eval | train
    checkpoint: str | None = None  # N (checkpoint-N) | best | None (the run's final weights)
    base: bool = False             # target is a recipe (or run) whose base model is scored, no method
    predictions: str | None = None  # JSONL path
    report: str | None = None       # folder for metrics.json, per_class.json, confusion_matrix.png
    generate: bool = False          # causal LM: generation metrics even if the recipe names none
    settings: GenerationSettings | None = None


def checkpoint_dir(run_dir: Path, which: str | None) -> Path:
    """The folder whose adapter.safetensors is scored: the run itself, checkpoint-N, or the best checkpoint."""
    if which is None:
        return run_dir
    if which == "best":
        state = run_dir / "trainer_state.json"
        best = json.loads(state.read_text(encoding="utf-8")).get("best_model_checkpoint") if state.is_file() else None
        if not best:
            raise UserError(f"{run_dir}: no best checkpoint was recorded; train with train.metric_for_best_model and "
                            f"matching eval/save strategies, or pass --checkpoint N")
        path = run_dir / Path(best).name  # the run folder may have moved since training
    elif which.isdigit():
        path = run_dir / f"{checkpoints.PREFIX}{int(which)}"
    else:
        raise UserError(f"--checkpoint {which!r}: give a step number N (for checkpoint-N) or best")
    if not (path / TENSORS).is_file():
        found = ", ".join(p.name for _, p in checkpoints.list_checkpoints(run_dir)) or "none"
        raise UserError(f"--checkpoint {which}: {path} holds no {TENSORS}; this run's checkpoints: {found}")
    return path


def load_target(target: str, base: bool = False, which: str | None = None) -> Loaded:
    if not base:
        read_run(target)  # a clear error before anything else when target is not a run
        recipe, record, model, tokenizer = load_trained(target, checkpoint_dir(Path(target), which))
        tasks = tasks_from_record(record) if record.get("tasks") else None
        return Loaded(recipe, model, tokenizer, record.get("labels"), record.get("num_labels"), tasks)
    if which:
        raise UserError("--checkpoint and --base exclude each other: --base scores the untrained base model")
    from transformers import set_seed

    recipe = target_recipe(target, base)
    the_plan = plan(recipe)  # label order inferred from the train data, exactly as training would
    set_seed(recipe.train.get("seed", 42))  # an untrained head is random: seeded, so the score repeats
    if the_plan.tasks:  # fresh (seeded) task heads and no method
        model = load_model(recipe.model)
        add_task_heads(model, the_plan.tasks)
        install_routing(model, task_heads(model))
    else:
        model = load_model(recipe.model, the_plan.num_labels, the_plan.data.labels)
    model.eval()
    return Loaded(recipe, model, the_plan.tokenizer, the_plan.data.labels, the_plan.num_labels, the_plan.tasks)


def eval_rows(recipe: Recipe, data: str | None, split: str, target: str) -> tuple[DataSection, list[dict]]:
    section = recipe.data
    if data:  # a user-named file is scored whole
        section = dataclasses.replace(section, eval=data, eval_fraction=None, limit={})
    elif split == "train":
        section = dataclasses.replace(section, eval=section.train, eval_fraction=None,
                                      limit={"eval": section.limit["train"]} if "train" in section.limit else {})
    if not (section.eval or section.eval_fraction):
        raise UserError(f"{target}: the recipe has no eval data; pass --data PATH")
    return section, load_splits(section, recipe.train.get("seed", 42))[1]


def metric_names(recipe: Recipe, num_labels: int | None) -> list[str]:
    return recipe.eval.metrics or DEFAULT_METRICS["regression" if num_labels == 1 else recipe.model.task]


def generation_names(names: list[str], forced: bool) -> list[str]:
    """The generation metrics to compute: those the recipe names, else all of them when generation is asked for."""
    chosen = [n for n in names if n in GENERATION or n.startswith(EVALUATE_PREFIX)]
    return chosen or (list(GENERATION) if forced else [])


def target_recipe(target: str, base: bool = False) -> Recipe:
    """The recipe of a run (its recipe.yaml); with --base, of a recipe file or of a run."""
    if not base:
        return read_run(target)[0]  # a clear error before anything else when target is not a run
    path = Path(target)
    return load_recipe(path / RECIPE if path.is_dir() and is_run_dir(path) else path)


# Where in a run folder peft eval may write: names `peft train` never uses.
OUTSIDE_RUN_FILES = {"--predictions": "predictions.jsonl", "--report": "eval"}


def check_eval_outputs(target: str, options: EvalOptions, recipe: Recipe) -> str | None:
    """Refuse --predictions / --report paths that would write over one of the run's own files, into its
    checkpoints, or over or into its inputs (base model, data, the recipe). Returns the option whose path lies in
    the run folder, else None: such writes hold the run's lock."""
    path = Path(target)
    run = path if path.is_dir() and is_run_dir(path) else None
    inputs = input_paths(recipe, options.data) + ([path.resolve()] if path.is_file() else [])
    inside = None
    for option, out, written in _eval_outputs(options):
        for file in (out, *written):
            entry = run_entry_of(run, file) if run else None
            if entry:
                raise UserError(f"{option} {out}: would write over the run's own {entry}; write it elsewhere, e.g. "
                                f"{run / OUTSIDE_RUN_FILES[option]}")
            source = next((s for s in inputs if is_within(file, s)), None)
            if source is not None:
                raise UserError(f"{option} {out}: would write over or into {source}, an input of the run (its base "
                                f"model or data); write it elsewhere")
        if run is not None and is_within(out, run):
            inside = option
    return inside


def _eval_outputs(options: EvalOptions) -> list[tuple[str, Path, list[Path]]]:
    """(option, its path, the files it writes) for each output asked for."""
    found = []
    if options.predictions:
        found.append(("--predictions", Path(options.predictions).expanduser(), []))
    if options.report:
        folder = Path(options.report).expanduser()
        found.append(("--report", folder, [folder / name for name in ("metrics.json", PER_CLASS, CONFUSION)]))
    return found


def metric_code_names(recipe: Recipe) -> list[str]:
    """Every metric the recipe names, its tasks' included (only `evaluate:` ones matter to check_metrics_code)."""
    tasks = (recipe.data.tasks or {}).values()
    return [*(recipe.eval.metrics or []), *[name for task in tasks for name in (task.metrics or [])]]


def evaluate(target: str, options: EvalOptions) -> dict:
    """Score `target`. Its outputs and metric code are checked before any weight loads; outputs in the run folder
    are written under the run's lock, so no `peft train` of that run changes it meanwhile."""
    recipe = target_recipe(target, options.base)
    check_metrics_code(metric_code_names(recipe), recipe.eval.trust_metric_code)
    option = check_eval_outputs(target, options, recipe)
    if option is None:
        return _evaluate(target, options)
    command = " ".join(["peft eval", target, *[f"{o} {p}" for o, p, _ in _eval_outputs(options)]])
    with hold_run_lock(target, command, option):
        return _evaluate(target, options)


def _evaluate(target: str, options: EvalOptions) -> dict:
    loaded = load_target(target, options.base, options.checkpoint)
    recipe = loaded.recipe
    if loaded.tasks:
        return _evaluate_tasks(loaded, options, target)
    section, rows = eval_rows(recipe, options.data, options.split, target)
    names = metric_names(recipe, loaded.num_labels)
    report = None
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _predictor(loaded, names, scratch)
        if recipe.model.task == "causal-lm":
            metrics, predictions = _score_lm(trainer, loaded, section, rows, names, options)
        else:
            metrics, predictions, report = _score_labels(trainer, loaded, section, rows)
    if options.predictions:
        write_predictions(predictions, options.predictions)
    if options.report:
        atomic_write(Path(options.report) / "metrics.json", json.dumps(metrics, indent=2))
        if report:
            write_report(report, Path(options.report))
    return metrics


def _predictor(loaded: Loaded, names: list[str], scratch: str):
    """A plain Trainer for batched, device-placed prediction with the task's collator and metrics."""
    from transformers import Trainer, TrainingArguments

    recipe = loaded.recipe
    args = TrainingArguments(output_dir=scratch, report_to="none", per_device_eval_batch_size=recipe.eval.batch_size,
                             remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
                             dataloader_pin_memory=torch.cuda.is_available())
    return Trainer(model=loaded.model, args=args, data_collator=make_collator(recipe.model.task, loaded.tokenizer),
                   processing_class=loaded.tokenizer,
                   compute_metrics=make_compute_metrics(recipe.model.task, names, loaded.num_labels, loaded.labels)
                   if names else None)  # multi-task: predict_tasks sets each task's own


def clean(raw: dict) -> dict:
    metrics = {k[len("eval_"):]: v for k, v in raw.items() if k.startswith("eval_")}
    return {k: v for k, v in metrics.items() if k not in NOT_METRICS}


def _score_labels(trainer, loaded: Loaded, section: DataSection, rows: list[dict]):
    task = loaded.recipe.model.task
    features = prepare(task, loaded.tokenizer, section, loaded.recipe.model, rows, None, labels=loaded.labels).train
    out = trainer.predict(features, metric_key_prefix="eval")
    logits = logits_of(out)
    report = labels_report(task, logits, out.label_ids, loaded.labels) if loaded.labels else None
    return clean(out.metrics), label_predictions(task, rows, section, logits, out.label_ids, loaded.labels), report


def label_predictions(task, rows, section: DataSection, logits, label_ids, labels) -> list[dict]:
    """One JSON object per eval row, labels mapped back to their names."""
    if task == "token-classification":
        _, predicted = tag_sequences(logits.argmax(-1), label_ids, labels)
        return [{"tokens": row[section.tokens], "tags": [str(t) for t in row[section.tags]], "predicted": tags}
                for row, tags in zip(rows, predicted)]
    texts = [example_inputs(task, row, section) for row in rows]
    if labels is None:  # regression
        return [{**t, "label": float(g), "prediction": float(p)}
                for t, g, p in zip(texts, label_ids.reshape(-1), logits.reshape(-1))]
    probabilities = torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()
    return [{**t, "label": labels[int(g)], "prediction": labels[int(p.argmax())], "score": float(p.max())}
            for t, g, p in zip(texts, label_ids, probabilities)]


def example_inputs(task: str, row: dict, section: DataSection) -> dict:
    """What a prediction line shows of its input: the text (pair), or the image's path."""
    if task == "image-classification":
        value = row.get(section.image)
        path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
        return {"image": path}
    return {"text": row[section.text], **({"text_pair": row[section.text_pair]} if section.text_pair else {})}


def _score_lm(trainer, loaded: Loaded, section: DataSection, rows: list[dict], names: list[str],
              options: EvalOptions):
    recipe = loaded.recipe
    features = prepare("causal-lm", loaded.tokenizer, section, recipe.model, rows, None).train
    loss = trainer.evaluate(features)["eval_loss"]
    metrics = {k: v for k, v in lm_metrics(loss).items() if k in names}
    chosen = generation_names(names, options.generate or bool(options.predictions))
    if not chosen:
        return metrics, []
    settings = (options.settings or GenerationSettings()).for_recipe(recipe)
    scores, predictions = score_generation(loaded.model, loaded.tokenizer, rows, section, chosen, settings,
                                           recipe.eval.batch_size)
    return {**metrics, **scores}, predictions


def score_generation(model, tokenizer, rows, section: DataSection, names, settings: GenerationSettings,
                     batch_size: int, key: str = "data.eval") -> tuple[dict, list[dict]]:
    """Generate a response to every eval prompt and score it against the row's reference response."""
    pairs = prompt_reference_pairs(rows, tokenizer, section, key)
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    generated = generate(model, tokenizer, prompts, settings, batch_size, max_prompt_tokens=section.max_length)
    scores = generation_metrics(generated, references, names)
    for name in names:
        if name.startswith(EVALUATE_PREFIX):
            scores.update(evaluate_metric(name, generated, references))
    return scores, [{"prompt": p, "reference": r, "generated": g} for p, r, g in zip(prompts, references, generated)]


def final_scores(trainer, the_plan, report_dir: Path | None = None) -> dict:
    """Metrics of the trained model on the plan's eval data; with `report_dir`, the per-class report beside them
    (multi-task runs: per task, in tasks/<name>/)."""
    recipe = the_plan.recipe
    if the_plan.tasks:
        outputs = predict_tasks(trainer, the_plan.tasks, the_plan.data.eval)
        if report_dir is not None and trainer.is_world_process_zero():
            write_task_reports(the_plan.tasks, outputs, Path(report_dir) / "tasks")
        return combine(outputs)
    if recipe.model.task == "causal-lm":
        metrics = {k: v for k, v in lm_metrics(trainer.evaluate()["eval_loss"]).items() if k in the_plan.metrics}
        chosen = generation_names(the_plan.metrics, False)
        if chosen:
            rows = load_splits(recipe.data, recipe.train.get("seed", 42))[1]
            settings = GenerationSettings().for_recipe(recipe)
            model = trainer.accelerator.unwrap_model(trainer.model)
            metrics.update(score_generation(model, the_plan.tokenizer, rows, recipe.data, chosen, settings,
                                            recipe.eval.batch_size)[0])
        return metrics
    out = trainer.predict(the_plan.data.eval, metric_key_prefix="eval")
    if report_dir is not None and the_plan.data.labels and trainer.is_world_process_zero():
        logits = logits_of(out)
        write_report(labels_report(recipe.model.task, logits, out.label_ids, the_plan.data.labels), report_dir)
    return clean(out.metrics)


def _evaluate_tasks(loaded: Loaded, options: EvalOptions, target: str) -> dict:
    """A multi-task run: every task on its own eval (or train) rows, metrics as in training."""
    if options.data:
        raise UserError(f"--data: {target} is a multi-task run, whose tasks read different columns; edit "
                        f"data.tasks.<name>.eval in a copy of its recipe.yaml instead")
    sections, datasets = {}, {}
    for task in loaded.tasks:
        section, rows = task_eval_rows(loaded.recipe, task, options.split)
        if rows is not None:
            sections[task.name] = (section, rows)
            datasets[task.name] = task_features(loaded.recipe, loaded.tokenizer, task, section, rows)
    if not datasets:
        raise UserError(f"{target}: no task of this multi-task run has eval data; set data.tasks.<name>.eval")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _predictor(loaded, [], scratch)
        trainer.model_accepts_loss_kwargs = False
        outputs = predict_tasks(trainer, loaded.tasks, datasets)
    metrics = combine(outputs)
    if options.predictions:
        lines = []
        for task in (t for t in loaded.tasks if t.name in outputs):
            section, rows = sections[task.name]
            prediction = outputs[task.name][1]
            lines += [{"task": task.name, **line} for line in label_predictions(
                "sequence-classification", rows, section, logits_of(prediction), prediction.label_ids, task.labels)]
        write_predictions(lines, options.predictions)
    if options.report:
        atomic_write(Path(options.report) / "metrics.json", json.dumps(metrics, indent=2))
        write_task_reports(loaded.tasks, outputs, Path(options.report))
    return metrics


def write_task_reports(tasks, outputs: dict, folder: Path) -> None:
    for task in tasks:
        if task.name in outputs and task.labels:
            prediction = outputs[task.name][1]
            report = labels_report("sequence-classification", logits_of(prediction), prediction.label_ids, task.labels)
            write_report(report, folder / task.name)
