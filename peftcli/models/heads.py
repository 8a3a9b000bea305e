"""Task heads: which modules form a model's head (always trained with any method), and multi-task heads, one per
task, with the routing that sends each batch to its task's head and loss."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..data.multitask import TASK_IDS, TaskInfo
from ..errors import UserError
from .modules import replace_module

HEAD_CHOICES = ("auto", "classifier", "none")


def head_modules(model: nn.Module, head: str = "auto") -> list[str]:
    """The task head as the architecture defines it, by module name: what the task model adds beside its backbone
    (`classifier`, `score`, `pre_classifier`...) and, with `auto`, the backbone's pooler that feeds it (BERT and
    ELECTRA-style models read [CLS] through a dense + tanh pooler that PEFT methods would otherwise leave frozen).
    Read from the model before a method adds modules of its own. Causal-LM models have no task head: their
    output layer is pretrained, and often tied to the embeddings."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if head == "none" or not isinstance(backbone, nn.Module) or model.get_output_embeddings() is not None:
        return []
    names = [name for name, child in model.named_children()
             if name != prefix and next(child.parameters(), None) is not None]
    pooler = getattr(backbone, "pooler", None)
    if head == "auto" and isinstance(pooler, nn.Module) and next(pooler.parameters(), None) is not None:
        names.append(f"{prefix}.pooler")
    return names


def unfreeze_head(model: nn.Module, names: list[str]) -> list[str]:
    """Train the head modules (after the method is injected: a method that wraps one trains along); returns the
    names of their parameters."""
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    return [n for n, _ in model.named_parameters() if in_head(n, names)]


def in_head(param_name: str, names) -> bool:
    return any(param_name.startswith(f"{name}.") for name in names)


def trained_head(model: nn.Module) -> list[str]:
    """The head modules a prepared model trains (recorded by prepare_model; DDP/FSDP wrappers looked through)."""
    while not hasattr(model, "peft_head") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return list(getattr(model, "peft_head", []))


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
    """The module multi-task runs replace by one head per task: the task model's output layer beside its backbone
    (the last of them: DistilBERT's `classifier` after its `pre_classifier`)."""
    outside = [name for name in head_modules(model, "classifier")]
    if not outside:
        raise UserError(f"model.name_or_path: {type(model).__name__} has no classification head beside its "
                        f"backbone; data.tasks cannot give it one head per task")
    return outside[-1]


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
