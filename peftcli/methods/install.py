"""Turning a base model into the trainable model of a recipe: freeze, inject the method, train the head(s)."""
from __future__ import annotations

from torch import nn

from ..models.heads import add_task_heads, head_modules, install_routing, task_heads, unfreeze_head
from . import get_method
from .registry import freeze_all
from .sharing import tie_across_layers


def prepare_model(model: nn.Module, method_name: str, cfg, share_across_layers: bool = False, tasks=None,
                  head: str = "auto"):
    """Freeze the base, inject the method (optionally tying its tensors across layers), train the task head
    (`model.head`: the architecture's whole head by default, read before the method adds modules of its own).
    `tasks` (multi-task runs, data.multitask.TaskInfo per task): the head becomes one head per task before the
    method is injected (so the method's tensors serve every task), and batches are routed to their task's head."""
    if tasks:
        add_task_heads(model, tasks)
    head_names = head_modules(model, head)
    model.peft_head = head_names  # read by export (modules_to_save) and by methods that leave the head alone
    freeze_all(model)
    base = {id(p) for p in model.parameters()} if share_across_layers else set()
    model = get_method(method_name).inject(model, cfg)
    if share_across_layers:
        tie_across_layers(model, method_name, cfg, base)
    unfreeze_head(model, head_names)
    model.peft_head = head_names  # on the model inject returned
    if tasks:
        install_routing(model, task_heads(model))
    return model
