"""The Method record, its contract, and the helpers every method shares (freezing, module swapping, targets)."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch
from torch import nn

ALL_TASKS = frozenset({"sequence-classification", "causal-lm", "token-classification", "seq2seq",
                       "image-classification"})
# Output projections that `all-linear` leaves alone: tying them to the vocabulary makes them heads, not layers.
OUTPUT_LAYER_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler.dense")


@dataclasses.dataclass(frozen=True)
class Method:
    """A PEFT method. Contract, checked for every registered method by tests/test_lifecycle.py:
    1. after inject(), exactly the method's own parameters (plus the task head) have requires_grad=True;
    2. inject(fresh base, cfg) + the saved trainable tensors (+ extra_state) reproduces the trained model exactly;
    3. merge, when not None, returns a plain HF model (same state_dict keys as the base) with the same outputs;
    4. the config's defaults work on the tiny test models of every task the method declares."""

    name: str
    summary: str
    config_cls: type
    inject: Callable[[nn.Module, object], nn.Module]
    merge: Callable[[nn.Module, object], nn.Module] | None = None
    merge_hint: str = ""  # for unmergeable methods: what to use instead
    tasks: frozenset = ALL_TASKS
    callbacks: Callable[[object, nn.Module], list] | None = None  # (cfg, model) -> [MethodCallback]
    extra_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None  # non-trainable state to save
    validate: Callable[[object], str | None] | None = None  # cross-field config checks -> error message
    # Saved form of the tensors when it differs from the live one (e.g. a sparse diff as indices + values);
    # unpack_state is its inverse, applied before loading.
    pack_state: Callable[[nn.Module, dict], dict] | None = None
    unpack_state: Callable[[nn.Module, dict], dict] | None = None
    paper: str = ""

    @property
    def mergeable(self) -> bool:
        return self.merge is not None


def _ignore_event(*args, **kwargs) -> None:
    return None


class MethodCallback:
    """Base of the methods' training callbacks, standing in for transformers.TrainerCallback: importing that one
    loads transformers' trainer stack, which imports HF peft and bitsandbytes (seconds, and a bitsandbytes warning)
    into every command that only lists or checks methods. The Trainer calls events by name (getattr), so an event
    a callback does not define is a no-op here, as in TrainerCallback, including events of newer transformers."""

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return _ignore_event
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def linear_names(model: nn.Module, kinds=(nn.Linear,)) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def match_targets(model: nn.Module, targets, kinds=(nn.Linear,)) -> list[str]:
    """Module names selected by `targets`: a list of name suffixes, a regex string (full match),
    or "all-linear" (every linear layer except output heads)."""
    candidates = linear_names(model, kinds)
    if targets == "all-linear":
        return [n for n in candidates if not any(n == o or n.endswith("." + o) or n.startswith(o + ".")
                                                 for o in OUTPUT_LAYER_NAMES)]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [n for n in candidates if pattern.fullmatch(n)]
    return [n for n in candidates if any(n == t or n.endswith("." + t) for t in targets)]


def target_error(model: nn.Module, targets, kinds=(nn.Linear,)) -> str:
    """The message for target_modules that match nothing: list the suffixes that exist."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model, kinds)})
    return f"target_modules {targets!r} matches no layer of this model; its layers are: {', '.join(suffixes)}"


_LAYER_INDEX = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Transformer block index in a parameter/module name (`...layer.3.attention...` -> 3), or None."""
    match = _LAYER_INDEX.search("." + name)
    return int(match.group(1)) if match else None


def num_layers(model: nn.Module) -> int:
    indices = [layer_index(n) for n, _ in model.named_parameters()]
    return max((i for i in indices if i is not None), default=-1) + 1
