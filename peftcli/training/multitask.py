"""Training and scoring multi-task runs (`data.tasks`): single-task batches, per-task metrics, and their averages.

Metrics are per task (`sst2/accuracy`) plus `macro/<metric>` (metrics every task has) and `macro/score` (mean of
each task's first metric), which picks the best checkpoint unless train.metric_for_best_model names another.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config.multitask import MACRO
from ..data.multitask import TaskBatchSampler, TaskInfo
from ..errors import UserError
from .eval_settings import check_training_eval as check_eval
from .metrics import DEFAULT_METRICS, NOT_METRICS, check_metrics, make_compute_metrics

MACRO_SCORE = "macro/score"
LOWER_IS_BETTER = {"loss", "mse"}


def choose_metrics(recipe, task: TaskInfo) -> list[str]:
    """The task's metrics: its own, else eval.metrics, else the defaults of its kind (classification/regression)."""
    section = recipe.data.tasks[task.name]
    name = task.name
    metrics = section.metrics or recipe.eval.metrics or DEFAULT_METRICS[
        "regression" if task.num_labels == 1 else "sequence-classification"]
    try:
        check_metrics(metrics, "sequence-classification", task.num_labels == 1, recipe.eval.trust_metric_code)
    except UserError as exc:  # name the key that set them: the task's own metrics, or eval.metrics for all tasks
        key = f"data.tasks.{name}.metrics" if section.metrics else f"eval.metrics (for task {name}; set " \
                                                                   f"data.tasks.{name}.metrics)"
        raise UserError(str(exc).replace("eval.metrics", key, 1)) from None
    if metrics[0] in LOWER_IS_BETTER:
        raise UserError(f"data.tasks.{name}.metrics: the first metric enters the macro/score average, where higher "
                        f"is better; list {metrics[0]} after another one")
    return list(metrics)


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
    check_eval(recipe, [], None, has_eval, watchable=watchable(tasks))


class TaskBatchesMixin:
    """For PeftTrainer: with `tasks`, single-task batches (TaskBatchSampler) and per-task evaluation; without,
    the Trainer's own behaviour."""

    def __init__(self, *args, tasks: list[TaskInfo] | None = None, sampling: str = "proportional",
                 sampling_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.tasks, self.sampling, self.sampling_temperature = tasks, sampling, sampling_temperature

    def get_train_dataloader(self):
        if not self.tasks:
            return super().get_train_dataloader()
        sampler = TaskBatchSampler([len(t.train) for t in self.tasks], self._train_batch_size, self.sampling,
                                   self.sampling_temperature, self.args.seed)
        loader = torch.utils.data.DataLoader(self.train_dataset, batch_sampler=sampler,
                                             collate_fn=self.data_collator,
                                             num_workers=self.args.dataloader_num_workers,
                                             pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if not self.tasks:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        datasets = eval_dataset if isinstance(eval_dataset, dict) else self.eval_dataset
        outputs = predict_tasks(self, self.tasks, datasets)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in combine(outputs, keep_loss=True).items()}
        metrics[f"{metric_key_prefix}_loss"] = metrics.pop(f"{metric_key_prefix}_{MACRO}/loss")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def predict_tasks(trainer, tasks: list[TaskInfo], datasets: dict[str, list]) -> dict[str, tuple]:
    """task name -> (metrics without prefix, PredictionOutput) for every task with eval data."""
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


def logits_of(prediction) -> np.ndarray:
    return prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
