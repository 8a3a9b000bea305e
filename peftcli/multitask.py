"""Multi-task runs (`data.tasks`): several sequence-classification datasets, one shared method, one head per task.

- Recipe: `data.tasks.<name>` holds a task's data keys (train, eval, text, text_pair, label, limit, ...); keys it
  leaves out take the `data:` section's value. `data.sampling` picks each batch's task.
- Model: the base model with the method injected as usual (so its tensors serve every task) and its own head
  module (`classifier` / `score`) replaced by `TaskHeads`, one fresh head per task. Forward hooks route: the batch's
  `task_ids` pick the head, and the loss is that task's (cross-entropy, or MSE for a 1-label regression task),
  so the model stays the HF model (its Trainer, save and merge code paths are unchanged).
- Batches are single-task (`TaskBatchSampler`), reproducible from (seed, epoch), so resuming skips exactly the
  batches already seen.
- Metrics are per task (`sst2/accuracy`) plus `macro/<metric>` (metrics every task has) and `macro/score` (mean
  of each task's first metric), which picks the best checkpoint unless train.metric_for_best_model names another.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .methods.registry import HEAD_NAMES, replace_module
from .recipe import DataSection, TaskDataSection
from .schema import Where
from .yamlio import LocDict

# data-level keys that act as every task's default (the others are single-task only or not per task)
INHERITED = ("eval_fraction", "format", "columns", "text", "text_pair", "label", "max_length", "limit")
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MACRO = "macro"
MACRO_SCORE = "macro/score"
TASK_IDS = "task_ids"
LOWER_IS_BETTER = {"loss", "mse"}


@dataclasses.dataclass
class TaskInfo:
    """One task as trained: its id (position in data.tasks), labels and metrics; features once tokenised."""

    name: str
    index: int
    labels: list[str] | None  # None: regression
    num_labels: int
    metrics: list[str]
    train: list[dict] = dataclasses.field(default_factory=list, repr=False)
    eval: list[dict] | None = dataclasses.field(default=None, repr=False)

    def record(self) -> dict:
        return {"name": self.name, "labels": self.labels, "num_labels": self.num_labels, "metrics": self.metrics,
                "train_rows": len(self.train)}


def tasks_from_record(record: dict) -> list[TaskInfo]:
    return [TaskInfo(t["name"], i, t["labels"], t["num_labels"], t["metrics"]) for i, t in enumerate(record["tasks"])]


# ---- recipe ----

def inherit_defaults(section: dict, where: Where) -> dict:
    """The data mapping with each task's missing keys filled from the data level (line numbers kept)."""
    tasks = section["tasks"]
    out_tasks = LocDict()
    if isinstance(tasks, LocDict):
        out_tasks.lines, out_tasks.line = tasks.lines, tasks.line
    for name, task in tasks.items():
        if isinstance(task, dict):
            filled = LocDict({k: section[k] for k in INHERITED if k in section and k not in task})
            filled.update(task)
            if isinstance(task, LocDict):
                filled.lines = {**{k: section.lines.get(k) for k in filled if isinstance(section, LocDict)},
                                **task.lines}
                filled.line = task.line
            task = filled
        out_tasks[name] = task
    out = LocDict(section)
    if isinstance(section, LocDict):
        out.lines, out.line = section.lines, section.line
    out["tasks"] = out_tasks
    return out


def check_recipe(recipe, data: dict, root: Where) -> None:
    """What a multi-task recipe cannot combine with; every message names the key and the fix."""
    where = root.child("data", data)
    section = data["data"]
    for key in ("train", "eval"):
        if getattr(recipe.data, key) is not None:
            raise where.child(key, section).error(
                f"data.{key} and data.tasks exclude each other: move it under data.tasks.<name>.{key} "
                f"(or drop data.tasks for a single-task run)")
    tasks_where = where.child("tasks", section)
    if not recipe.data.tasks:
        raise tasks_where.error("is empty; list at least one task, e.g. tasks: {sst2: {train: ..., eval: ...}}")
    for name in recipe.data.tasks:
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or name == MACRO:
            raise tasks_where.error(f"task name {name!r}: use letters, digits, '_', '-' or '.' (it names metrics "
                                    f"and folders; '{MACRO}' is reserved for the average)")
    model_where = root.child("model", data)
    if recipe.model.task != "sequence-classification":
        raise model_where.child("task", data["model"]).error(
            f"data.tasks trains sequence-classification heads; '{recipe.model.task}' is single-task only")
    for key in ("labels", "num_labels"):
        if getattr(recipe.model, key) is not None:
            raise model_where.child(key, data["model"]).error(
                f"with data.tasks each task has its own; set data.tasks.<name>.{key} instead")
    if recipe.distill is not None:
        raise root.error("distill: the teacher has one head, a multi-task run one per task; drop distill or "
                         "data.tasks")


def as_data_section(task: TaskDataSection) -> DataSection:
    """The task's keys as a single-task data section, for the shared readers and tokenisers."""
    names = {f.name for f in dataclasses.fields(DataSection)} & {f.name for f in dataclasses.fields(TaskDataSection)}
    return DataSection(**{name: getattr(task, name) for name in names})


def _for_task(name: str, error: UserError) -> UserError:
    """A data error of one task, re-addressed from `data.x` to `data.tasks.<name>.x`."""
    text = str(error)
    text = text.replace("data.", f"data.tasks.{name}.", 1) if text.startswith("data.") else \
        f"data.tasks.{name}: {text}"
    return UserError(text)


# ---- plan ----

def plan_tasks(recipe):
    """commands.Plan for a multi-task recipe: every task's data read, tokenised and labelled; heads and method
    checked on the meta-device skeleton."""
    from .commands import Plan, check_enough_rows
    from .models import build_skeleton, load_tokenizer
    from .tasks import Prepared

    tokenizer = load_tokenizer(recipe.model)
    tasks = [_prepare_task(recipe, tokenizer, name, index) for index, name in enumerate(recipe.data.tasks)]
    train = [f for t in tasks for f in t.train]
    check_enough_rows(recipe, len(train))
    evals = {t.name: t.eval for t in tasks if t.eval is not None}
    check_training_eval(recipe, tasks, bool(evals))
    skeleton = build_skeleton(recipe.model)
    prepare_task_model(skeleton, recipe, tasks)
    plan = Plan(recipe, tokenizer, Prepared(train, evals or None, None, {}), None, [MACRO_SCORE])
    plan.tasks = tasks
    return plan


def _prepare_task(recipe, tokenizer, name: str, index: int) -> TaskInfo:
    from .data import load_splits
    from .metrics import DEFAULT_METRICS, check_metrics
    from .tasks import prepare

    section = recipe.data.tasks[name]
    model = dataclasses.replace(recipe.model, labels=section.labels, num_labels=section.num_labels)
    try:
        rows, eval_rows = load_splits(as_data_section(section), recipe.train.get("seed", 42))
        prepared = prepare("sequence-classification", tokenizer, as_data_section(section), model, rows, eval_rows)
    except UserError as exc:
        raise _for_task(name, exc) from None
    num_labels = len(prepared.labels) if prepared.labels else 1
    metrics = section.metrics or recipe.eval.metrics or DEFAULT_METRICS[
        "regression" if num_labels == 1 else "sequence-classification"]
    try:
        check_metrics(metrics, "sequence-classification", num_labels == 1)
    except UserError as exc:  # name the key that set them: the task's own metrics, or eval.metrics for all tasks
        key = f"data.tasks.{name}.metrics" if section.metrics else f"eval.metrics (for task {name}; set " \
                                                                   f"data.tasks.{name}.metrics)"
        raise UserError(str(exc).replace("eval.metrics", key, 1)) from None
    if metrics[0] in LOWER_IS_BETTER:
        raise UserError(f"data.tasks.{name}.metrics: the first metric enters the macro/score average, where higher "
                        f"is better; list {metrics[0]} after another one")
    tag = lambda features: [{**f, TASK_IDS: index} for f in features]  # noqa: E731
    return TaskInfo(name, index, prepared.labels, num_labels, list(metrics), tag(prepared.train),
                    None if prepared.eval is None else tag(prepared.eval))


def watchable(tasks: list[TaskInfo]) -> set[str]:
    """Metric names evaluation during training reports (train.metric_for_best_model picks one)."""
    names = {"loss", MACRO_SCORE} | {f"{MACRO}/{m}" for m in shared_metrics(tasks)}
    for task in tasks:
        names |= {f"{task.name}/{m}" for m in task.metrics + ["loss"]}
    return names


def shared_metrics(tasks: list[TaskInfo]) -> list[str]:
    scored = [t for t in tasks if t.eval is not None] or tasks
    return [m for m in scored[0].metrics if all(m in t.metrics for t in scored)]


def check_training_eval(recipe, tasks: list[TaskInfo], has_eval: bool) -> None:
    from .training_eval import check_training_eval as check

    check(recipe, [], None, has_eval, watchable=watchable(tasks))


# ---- model ----

class TaskHeads(nn.Module):
    """In place of the model's head: one head per task; `active` (set by the routing hook) picks the one used."""

    def __init__(self, template: nn.Module, tasks: list[TaskInfo], init_std: float):
        super().__init__()
        self.heads = nn.ModuleDict({t.name: fresh_head(template, t.num_labels, init_std) for t in tasks})
        self.names = [t.name for t in tasks]
        self.num_labels = {t.name: t.num_labels for t in tasks}
        self.active = self.names[0]

    def forward(self, *args, **kwargs):
        return self.heads[self.active](*args, **kwargs)


def fresh_head(template: nn.Module, num_labels: int, init_std: float) -> nn.Module:
    """A copy of the model's head whose output layer (its last Linear) is new, with `num_labels` outputs and
    the initialisation HF gives classification heads (normal(0, initializer_range), zero bias)."""
    head = copy.deepcopy(template)
    linears = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"model.name_or_path: its head ({type(template).__name__}) has no linear output layer to "
                        f"give each task its own labels; data.tasks needs one")
    old = head.get_submodule(linears[-1])
    new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    if old.weight.device.type != "meta":
        with torch.no_grad():
            new.weight.normal_(0.0, init_std)
            if new.bias is not None:
                new.bias.zero_()
    if linears[-1] == "":
        return new
    replace_module(head, linears[-1], new)
    return head


def head_name(model: nn.Module) -> str:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise UserError(f"model.name_or_path: {type(model).__name__} has no classification head named "
                    f"{' or '.join(HEAD_NAMES)}; data.tasks cannot give it one head per task")


def task_heads(model: nn.Module) -> TaskHeads:
    return next(m for m in model.modules() if isinstance(m, TaskHeads))


def add_task_heads(model: nn.Module, tasks: list[TaskInfo]) -> None:
    name = head_name(model)
    heads = TaskHeads(getattr(model, name), tasks, getattr(model.config, "initializer_range", 0.02))
    replace_module(model, name, heads)


def prepare_task_model(model: nn.Module, recipe, tasks: list[TaskInfo]) -> nn.Module:
    """Heads per task, then the method (injected into the shared model as for one task), then the routing."""
    from .runs import prepare_model

    add_task_heads(model, tasks)
    model = prepare_model(model, recipe.method_name, recipe.method, recipe.share_across_layers)
    install_routing(model, task_heads(model))
    return model


def base_task_model(recipe, tasks: list[TaskInfo]) -> nn.Module:
    """`peft eval --base`: the base model with fresh (seeded) task heads and no method."""
    from .models import load_model

    model = load_model(recipe.model)
    add_task_heads(model, tasks)
    install_routing(model, task_heads(model))
    return model


def load_task_model(recipe, tasks: list[TaskInfo]) -> nn.Module:
    """The base model (pretrained weights) prepared for `tasks`; trained tensors are loaded by the caller."""
    from .models import load_model

    return prepare_task_model(load_model(recipe.model), recipe, tasks)


def install_routing(model: nn.Module, heads: TaskHeads) -> None:
    """Forward hooks: before, take `task_ids` and `labels` out of the call and select the head; after, put the
    task's loss into the output. The model's own loss would use its config's num_labels, not the task's."""
    pending: dict = {}

    def before(module, args, kwargs):
        task_ids = kwargs.pop(TASK_IDS, None)
        if task_ids is None:
            raise ValueError(f"a multi-task model needs {TASK_IDS} (the task's index) with every batch")
        ids = torch.as_tensor(task_ids).unique().tolist()
        if len(ids) != 1:
            raise ValueError(f"a batch mixes tasks {ids}; multi-task batches hold one task each")
        heads.active = heads.names[int(ids[0])]
        pending["labels"] = kwargs.pop("labels", None)
        return args, kwargs

    def after(module, args, kwargs, output):
        from transformers.modeling_outputs import SequenceClassifierOutput

        labels = pending.pop("labels", None)
        loss = None if labels is None else task_loss(output.logits, labels, heads.num_labels[heads.active])
        return SequenceClassifierOutput(loss=loss, logits=output.logits,
                                        hidden_states=getattr(output, "hidden_states", None),
                                        attentions=getattr(output, "attentions", None))

    # Prepended: methods that rewrite inputs in their own pre-hooks never see the routing keys.
    heads.hooks = (model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                   model.register_forward_hook(after, with_kwargs=True))


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    if num_labels == 1:  # regression, as HF's heads compute it
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
    return nn.functional.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1))


# ---- batches ----

class TaskBatchSampler(torch.utils.data.Sampler):
    """Single-task batches of indices into the concatenated train features (task i at offsets[i]).

    An epoch has sum_i ceil(n_i / batch_size) batches. Each task's batches are consecutive chunks of its rows in
    a fresh random order (the last chunk of a pass may be short); the task of each batch follows `strategy`:
    proportional: every task's chunks of exactly one pass, shuffled together (p_i ∝ n_i);
    temperature: drawn independently with p_i ∝ n_i^(1/T) (small tasks repeat, large ones are cut);
    round_robin: tasks in turn.
    The order depends only on (seed, epoch), so a resumed run sees the same batches and skips the seen ones.
    """

    def __init__(self, sizes: list[int], batch_size: int, strategy: str = "proportional",
                 temperature: float = 1.0, seed: int = 0):
        self.sizes, self.batch_size, self.strategy = list(sizes), batch_size, strategy
        self.temperature, self.seed, self.epoch = temperature, seed, 0
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.drop_last = False  # read by accelerate when it shards batches over processes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(n / self.batch_size) for n in self.sizes)

    def probabilities(self) -> np.ndarray:
        weights = np.asarray(self.sizes, dtype=np.float64) ** (1.0 / self.temperature)
        return weights / weights.sum()

    def task_order(self, rng: np.random.Generator) -> list[int]:
        if self.strategy == "round_robin":
            return [i % len(self.sizes) for i in range(len(self))]
        if self.strategy == "temperature":
            return rng.choice(len(self.sizes), size=len(self), p=self.probabilities()).tolist()
        order = [i for i, n in enumerate(self.sizes) for _ in range(math.ceil(n / self.batch_size))]
        return rng.permutation(order).tolist()

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self.task_order(rng)
        streams = [self._chunks(i, rng) for i in range(len(self.sizes))]
        for task in order:
            yield next(streams[task])

    def _chunks(self, task: int, rng: np.random.Generator):
        while True:
            rows = rng.permutation(self.sizes[task]) + self.offsets[task]
            for start in range(0, len(rows), self.batch_size):
                yield rows[start:start + self.batch_size].tolist()


# ---- training and metrics ----

def make_trainer_class():
    from .trainer import PeftTrainer

    class MultiTaskTrainer(PeftTrainer):
        """PeftTrainer with single-task batches and per-task evaluation (see the module docstring)."""

        def __init__(self, *args, tasks: list[TaskInfo], sampling: str = "proportional",
                     sampling_temperature: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.tasks, self.sampling, self.sampling_temperature = tasks, sampling, sampling_temperature

        def get_train_dataloader(self):
            sampler = TaskBatchSampler([len(t.train) for t in self.tasks], self._train_batch_size, self.sampling,
                                       self.sampling_temperature, self.args.seed)
            loader = torch.utils.data.DataLoader(self.train_dataset, batch_sampler=sampler,
                                                 collate_fn=self.data_collator,
                                                 num_workers=self.args.dataloader_num_workers,
                                                 pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            datasets = eval_dataset if isinstance(eval_dataset, dict) else self.eval_dataset
            outputs = predict_tasks(self, self.tasks, datasets)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in combine(outputs, keep_loss=True).items()}
            metrics[f"{metric_key_prefix}_loss"] = metrics.pop(f"{metric_key_prefix}_{MACRO}/loss")
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return MultiTaskTrainer


def predict_tasks(trainer, tasks: list[TaskInfo], datasets: dict[str, list]) -> dict[str, tuple]:
    """task name -> (metrics without prefix, PredictionOutput) for every task with eval data."""
    from .evaluation import NOT_METRICS
    from .metrics import make_compute_metrics

    saved = trainer.compute_metrics
    out = {}
    try:
        for task in tasks:
            if task.name not in (datasets or {}):
                continue
            trainer.compute_metrics = make_compute_metrics("sequence-classification", task.metrics,
                                                           task.num_labels, task.labels)
            prediction = trainer.predict(datasets[task.name], metric_key_prefix="eval")
            metrics = {k[len("eval_"):]: v for k, v in prediction.metrics.items() if k.startswith("eval_")}
            out[task.name] = ({k: v for k, v in metrics.items() if k == "loss" or k not in NOT_METRICS}, prediction)
    finally:
        trainer.compute_metrics = saved
    return out


def combine(outputs: dict[str, tuple], keep_loss: bool = False) -> dict:
    """Flat metrics: `<task>/<metric>`, `macro/<metric>` for metrics every scored task has, and `macro/score`,
    the mean of each task's first metric."""
    per_task = {name: metrics for name, (metrics, _) in outputs.items()}
    flat = {f"{name}/{k}": v for name, metrics in per_task.items() for k, v in metrics.items()
            if keep_loss or k != "loss"}
    if not per_task:
        return flat
    common = [k for k in next(iter(per_task.values())) if all(k in m for m in per_task.values())]
    for key in common:
        if keep_loss or key != "loss":
            flat[f"{MACRO}/{key}"] = float(np.mean([m[key] for m in per_task.values()]))
    firsts = [next(v for k, v in m.items() if k != "loss") for m in per_task.values()]
    flat[MACRO_SCORE] = float(np.mean(firsts))
    return flat


def final_scores(trainer, plan, report_dir: Path | None = None) -> dict:
    """Per-task metrics of the trained model on every task's eval data; per-class reports in tasks/<name>/."""
    outputs = predict_tasks(trainer, plan.tasks, plan.data.eval)
    if report_dir is not None and trainer.is_world_process_zero():
        write_reports(plan.tasks, outputs, Path(report_dir) / "tasks")
    return combine(outputs)


def write_reports(tasks: list[TaskInfo], outputs: dict, folder: Path) -> None:
    from .evaluation import labels_report
    from .report_eval import write_report

    for task in tasks:
        if task.name in outputs and task.labels:
            prediction = outputs[task.name][1]
            report = labels_report("sequence-classification", _logits(prediction), prediction.label_ids, task.labels)
            write_report(report, folder / task.name)


def _logits(prediction) -> np.ndarray:
    return prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions


def trainer_options(plan) -> dict:
    data = plan.recipe.data
    return {"tasks": plan.tasks, "sampling": data.sampling, "sampling_temperature": data.sampling_temperature}


# ---- peft eval ----

def evaluate(loaded, options, target: str) -> dict:
    """`peft eval` of a multi-task run: every task on its own eval (or train) rows, metrics as in training."""
    import tempfile

    from . import runs
    from .evaluation import label_predictions
    from .report_eval import write_predictions

    if options.data:
        raise UserError(f"--data: {target} is a multi-task run, whose tasks read different columns; edit "
                        f"data.tasks.<name>.eval in a copy of its recipe.yaml instead")
    tasks = loaded.tasks
    sections, datasets = {}, {}
    for task in tasks:
        section, rows = _eval_rows(loaded, task, options.split)
        if rows is not None:
            sections[task.name] = (section, rows)
            datasets[task.name] = _features(loaded, task, section, rows)
    if not datasets:
        raise UserError(f"{target}: no task of this multi-task run has eval data; set data.tasks.<name>.eval")
    with tempfile.TemporaryDirectory() as scratch:
        outputs = predict_tasks(_predictor(loaded, scratch), tasks, datasets)
    metrics = combine(outputs)
    if options.predictions:
        lines = []
        for task in tasks:
            if task.name in outputs:
                section, rows = sections[task.name]
                prediction = outputs[task.name][1]
                lines += [{"task": task.name, **line} for line in label_predictions(
                    "sequence-classification", rows, section, _logits(prediction), prediction.label_ids,
                    task.labels)]
        write_predictions(lines, options.predictions)
    if options.report:
        runs.atomic_write(Path(options.report) / "metrics.json", json.dumps(metrics, indent=2))
        write_reports(tasks, outputs, Path(options.report))
    return metrics


def _eval_rows(loaded, task: TaskInfo, split: str):
    from .data import load_splits

    section = as_data_section(loaded.recipe.data.tasks[task.name])
    if split == "train":
        section = dataclasses.replace(section, eval=section.train, eval_fraction=None,
                                      limit={"eval": section.limit["train"]} if "train" in section.limit else {})
    if not (section.eval or section.eval_fraction):
        return section, None
    try:
        return section, load_splits(section, loaded.recipe.train.get("seed", 42))[1]
    except UserError as exc:
        raise _for_task(task.name, exc) from None


def _features(loaded, task: TaskInfo, section: DataSection, rows: list[dict]) -> list[dict]:
    from .tasks import prepare

    model = dataclasses.replace(loaded.recipe.model, labels=None, num_labels=task.num_labels)
    try:
        features = prepare("sequence-classification", loaded.tokenizer, section, model, rows, None,
                           labels=task.labels).train
    except UserError as exc:
        raise _for_task(task.name, exc) from None
    return [{**f, TASK_IDS: task.index} for f in features]


def _predictor(loaded, scratch: str):
    from transformers import Trainer, TrainingArguments

    from .tasks import make_collator

    recipe = loaded.recipe
    args = TrainingArguments(output_dir=scratch, report_to="none", per_device_eval_batch_size=recipe.eval.batch_size,
                             remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
                             dataloader_pin_memory=torch.cuda.is_available())
    trainer = Trainer(model=loaded.model, args=args, data_collator=make_collator(recipe.model.task, loaded.tokenizer),
                      processing_class=loaded.tokenizer)
    trainer.model_accepts_loss_kwargs = False
    return trainer


# ---- merge-export ----

def merge_export(run_dir: str, out: str, dtype: str, overwrite: bool) -> Path:
    """One plain HF model per task in OUT/<task>/: the backbone with the method folded in plus that task's head
    as the model's own head (config num_labels / id2label set); OUT/tasks.json lists them."""
    from . import runs
    from .commands import check_finite
    from .methods import get_method

    recipe, record = runs.read_run(run_dir)
    method = get_method(record["method"])
    if not method.mergeable:
        raise UserError(f"method '{method.name}' cannot be merged into the base weights: {method.merge_hint} "
                        f"(use the run directory itself with `peft eval {run_dir}`)")
    target = runs.check_output_folder(run_dir, out, overwrite, "merged")
    _, _, model, tokenizer = runs.load_trained(run_dir)
    name = head_name(model)
    heads = getattr(model, name)
    model = method.merge(model, recipe.method)
    check_finite(model)
    model = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    for hook in heads.hooks:  # the routing: each exported model has a single head
        hook.remove()
    tasks = tasks_from_record(record)

    def fill(staging: Path) -> None:
        for task in tasks:
            setattr(model, name, heads.heads[task.name])
            _set_labels(model.config, task)
            model.save_pretrained(staging / task.name)
            tokenizer.save_pretrained(staging / task.name)
        listing = {t.name: {"folder": t.name, "labels": t.labels, "num_labels": t.num_labels} for t in tasks}
        runs.atomic_write(staging / "tasks.json", json.dumps(listing, indent=2))

    runs.write_folder_atomically(target, fill)
    return target


def _set_labels(config, task: TaskInfo) -> None:
    config.num_labels = task.num_labels
    names = task.labels or ["score"]
    config.id2label = dict(enumerate(names))
    config.label2id = {label: i for i, label in enumerate(names)}
    config.problem_type = "regression" if task.num_labels == 1 else "single_label_classification"
