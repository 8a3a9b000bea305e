"""Task heads: which modules form a model's head (always trained with any method), and multi-task heads, one per
task, with the routing that sends each batch to its task's head and loss."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..data.multitask import TASK_IDS, TaskInfo
from ..errors import UserError
from .modules import replace_module

# Task heads are always trained and saved with any method: they are new (randomly initialised) for the task.
HEAD_NAMES = ("classifier", "score")


def unfreeze_head(model: nn.Module) -> list[str]:
    """Train the task head (classifier / score); returns the names of its parameters."""
    names = []
    for name, p in model.named_parameters():
        if any(part in HEAD_NAMES for part in name.split(".")[:-1]):
            p.requires_grad_(True)
            names.append(name)
    return names


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


def set_labels(config, task: TaskInfo) -> None:
    config.num_labels = task.num_labels
    names = task.labels or ["score"]
    config.id2label = dict(enumerate(names))
    config.label2id = {label: i for i, label in enumerate(names)}
    config.problem_type = "regression" if task.num_labels == 1 else "single_label_classification"
