"""Module surgery shared by the models and methods layers: find a submodule's parent, swap a module in place."""
from __future__ import annotations

from torch import nn


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)
