"""Multi-task runs (`data.tasks`): several sequence-classification datasets, one shared method, one head per task.

- Recipe: `data.tasks.<name>` holds a task's data keys (train, eval, text, text_pair, label, limit, ...); keys it
  leaves out take the `data:` section's value. `data.sampling` picks each batch's task.
- Model: the base model with the method injected as usual (so its tensors serve every task) and its own head
  module (`classifier` / `score`) replaced by `TaskHeads`, one fresh head per task. Forward hooks route: the batch's
  `task_ids` pick the head, and the loss is that task's (cross-entropy, or MSE for a 1-label regression task),
  so the model stays the HF model (its Trainer, save and merge code paths are unchanged).
- Batches are single-task (`TaskBatchSampler`), reproducible from (seed, epoch), so resuming skips exactly the
  batches already seen.
- Metrics (training.multitask) are per task (`sst2/accuracy`) plus `macro/<metric>` (metrics every task has) and `macro/score` (mean
  of each task's first metric), which picks the best checkpoint unless train.metric_for_best_model names another.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..config.multitask import as_data_section
from ..errors import UserError
from .prepare import prepare
from .readers import load_splits

TASK_IDS = "task_ids"


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


def for_task(name: str, error: UserError) -> UserError:
    """A data error of one task, re-addressed from `data.x` to `data.tasks.<name>.x`."""
    text = str(error)
    text = text.replace("data.", f"data.tasks.{name}.", 1) if text.startswith("data.") else \
        f"data.tasks.{name}: {text}"
    return UserError(text)


def read_task(recipe, tokenizer, name: str, index: int) -> TaskInfo:
    """One task's rows read and tokenised (features tagged with its task id); metrics are chosen by the caller."""
    section = recipe.data.tasks[name]
    model = dataclasses.replace(recipe.model, labels=section.labels, num_labels=section.num_labels)
    try:
        rows, eval_rows = load_splits(as_data_section(section), recipe.train.get("seed", 42))
        prepared = prepare("sequence-classification", tokenizer, as_data_section(section), model, rows, eval_rows)
    except UserError as exc:
        raise for_task(name, exc) from None
    num_labels = len(prepared.labels) if prepared.labels else 1
    return TaskInfo(name, index, prepared.labels, num_labels, [], tag(prepared.train, index),
                    None if prepared.eval is None else tag(prepared.eval, index))


def tag(features: list[dict], index: int) -> list[dict]:
    return [{**f, TASK_IDS: index} for f in features]


def eval_rows(recipe, task: TaskInfo, split: str):
    """(data section, rows) a task is scored on by `peft eval`; rows None when the task has no eval data."""
    section = as_data_section(recipe.data.tasks[task.name])
    if split == "train":
        section = dataclasses.replace(section, eval=section.train, eval_fraction=None,
                                      limit={"eval": section.limit["train"]} if "train" in section.limit else {})
    if not (section.eval or section.eval_fraction):
        return section, None
    try:
        return section, load_splits(section, recipe.train.get("seed", 42))[1]
    except UserError as exc:
        raise for_task(task.name, exc) from None


def task_features(recipe, tokenizer, task: TaskInfo, section, rows: list[dict]) -> list[dict]:
    model = dataclasses.replace(recipe.model, labels=None, num_labels=task.num_labels)
    try:
        features = prepare("sequence-classification", tokenizer, section, model, rows, None, labels=task.labels).train
    except UserError as exc:
        raise for_task(task.name, exc) from None
    return tag(features, task.index)


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
