"""Trigger tokens: K real vocabulary tokens at a chosen place of the input, found by gradient-guided search."""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import UserError
from ..config.schema import field, fraction, positive
from .prompt_inputs import COMMON_TOKENS, PromptSource, install_prompts, text_ids, usable_token_ids
from .registry import Method, MethodCallback
from .soft_trigger_tokens import POSITION_DOC

logger = logging.getLogger("peftcli")

SOURCE = "trigger_tokens"  # the module holding the ids; its buffer is saved as trigger_tokens.trigger_ids
# The triggers change no weight: what trains by gradient is the task head, a classifier fitted on the frozen
# model's output as AutoPrompt fits its label mapping (Shin et al. 2020, Sec. 2.2). Tasks without a head (causal
# LM) would train nothing: use soft_trigger_tokens or prompt_tuning there.
TASKS = frozenset({"sequence-classification", "token-classification"})
MERGE_HINT = ("the triggers are tokens in the input, not a change to any weight, so there is nothing to fold; run "
              "with the run directory (it holds the trigger ids and the trained head)")


@dataclasses.dataclass
class TriggerTokensConfig:
    num_tokens: int = field(4, check=positive, doc="number of trigger tokens")
    position: int | Literal["end"] = field(1, doc=POSITION_DOC)
    init_text: str | None = field(None, doc="words the triggers start from (repeated to num_tokens); default: "
                                            "distinct common vocabulary words")
    num_candidates: int = field(10, check=positive, doc="tokens tried per trigger position at each search: the "
                                                        "top-k of the first-order estimate of the loss change")
    search_every: int = field(5, check=positive, doc="optimizer steps between searches (the head trains at every "
                                                     "step)")
    search_batches: int = field(4, check=positive, doc="latest training batches a search averages the gradient and "
                                                       "the candidates' loss over (one batch overfits the swap)")
    search_until: float = field(0.8, check=fraction, doc="fraction of the training steps after which the triggers "
                                                         "stay fixed, so that the head fits the final ones")


class DiscreteTriggers(PromptSource):
    """Trigger ids (a buffer saved with the run), embedded by the model's own frozen input embeddings at every
    forward, so the triggers are exactly those vocabulary tokens, in training, eval and generation alike."""

    def __init__(self, ids: torch.Tensor, position, allowed: torch.Tensor, embedding_of: Callable[[], nn.Module]):
        super().__init__()
        self.register_buffer("trigger_ids", ids)
        # Which rows a trigger may become (derived from the tokenizer, so not saved).
        self.register_buffer("allowed", allowed, persistent=False)
        self.groups = [(position, len(ids))]
        self.__dict__["embedding_of"] = embedding_of  # not a submodule: the table stays the model's own
        self.probe: torch.Tensor | None = None  # during a search: a leaf standing in for the trigger embeddings

    def table(self) -> torch.Tensor:
        return self.embedding_of().weight

    def embeddings(self) -> torch.Tensor:
        return self.embedding_of()(self.trigger_ids) if self.probe is None else self.probe


def trigger_gradient(model: nn.Module, source: DiscreteTriggers, batches: list[dict]) -> torch.Tensor:
    """[K, hidden]: gradient of the mean batch loss w.r.t. the triggers' input embeddings (no parameter's .grad
    is touched)."""
    source.probe = source.embeddings().detach().float().requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = sum(model(**batch).loss for batch in batches) / len(batches)
            return torch.autograd.grad(loss, source.probe)[0]
    finally:
        source.probe = None


def candidate_tokens(source: DiscreteTriggers, grad: torch.Tensor, k: int) -> list[list[int]]:
    """Per trigger position i, the k allowed tokens v with the lowest first-order loss change (e_v - e_i) . g_i
    (HotFlip-style token replacement, Wallace et al. 2019, Sec. 2, Eq. 2; AutoPrompt's candidate set, Shin et al.
    2020, Sec. 2.2, Eq. 2)."""
    table = source.table().detach()
    ids = source.trigger_ids
    change = (table @ grad.to(table.dtype).T).float() - (table[ids].float() * grad).sum(-1)  # [vocab, K]
    change[~source.allowed] = float("inf")
    change[ids, torch.arange(len(ids), device=ids.device)] = float("inf")  # the token already there
    values, picks = change.topk(min(k, change.shape[0]), dim=0, largest=False)
    return [picks[values[:, i].isfinite(), i].tolist() for i in range(len(ids))]


def mean_loss(model: nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        return sum(float(model(**batch).loss) for batch in batches) / len(batches)


def search_step(model: nn.Module, source: DiscreteTriggers, batches: list[dict], k: int) -> tuple[float, float]:
    """One search: score the vocabulary by the gradient, evaluate every single-token swap among the candidates on
    the batches, keep the best swap if it lowers the loss (AutoPrompt, Sec. 2.2). Returns (loss before, after).
    Runs in eval mode, so dropout does not decide between candidates."""
    was_training = model.training
    model.eval()
    try:
        candidates = candidate_tokens(source, trigger_gradient(model, source, batches), k)
        current = source.trigger_ids.clone()
        before = best = mean_loss(model, batches)
        best_ids = current
        for position, tokens in enumerate(candidates):
            for token in tokens:
                source.trigger_ids.copy_(current)
                source.trigger_ids[position] = token
                loss = mean_loss(model, batches)
                if loss < best:
                    best, best_ids = loss, source.trigger_ids.clone()
        source.trigger_ids.copy_(best_ids)
    finally:
        model.train(was_training)
    return before, best


def agree_across_ranks(ids: torch.Tensor) -> None:
    """Every rank searches its own batches; all ranks then keep rank 0's triggers."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(ids, src=0)


class TriggerSearchCallback(MethodCallback):
    """Keeps the latest training batches (seen by a forward pre-hook, before the triggers go in) and searches
    every `search_every` optimizer steps; the task head trains by gradient at every step in between."""

    def __init__(self, cfg: TriggerTokensConfig, model: nn.Module):
        self.cfg, self.model = cfg, model
        self.source = model.get_submodule(SOURCE)
        self.batches: collections.deque = collections.deque(maxlen=cfg.search_batches)
        self.handle = None

    def _keep(self, module, args, kwargs):
        if module.training and "labels" in kwargs:  # the Trainer's batches, never a search's own forwards
            self.batches.append({k: v for k, v in kwargs.items() if k != "num_items_in_batch"})

    def on_train_begin(self, args, state, control, **kwargs):
        self.handle = self.model.register_forward_pre_hook(self._keep, with_kwargs=True, prepend=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.batches.clear()

    def on_step_end(self, args, state, control, processing_class=None, **kwargs):
        late = state.global_step > self.cfg.search_until * state.max_steps
        if state.global_step % self.cfg.search_every or late or not self.batches:
            return
        before, after = search_step(self.model, self.source, list(self.batches), self.cfg.num_candidates)
        agree_across_ranks(self.source.trigger_ids)
        ids = self.source.trigger_ids.tolist()
        shown = processing_class.convert_ids_to_tokens(ids) if hasattr(processing_class, "convert_ids_to_tokens") \
            else ids
        logger.info("trigger tokens at step %d: %s (search batch loss %.4f -> %.4f)", state.global_step, shown,
                    before, after)


def initial_ids(model: nn.Module, cfg: TriggerTokensConfig, allowed: torch.Tensor) -> torch.Tensor:
    if cfg.init_text:
        ids = text_ids(model, cfg.init_text)
        return ids.repeat(-(-cfg.num_tokens // len(ids)))[:cfg.num_tokens]
    common = allowed[:COMMON_TOKENS]
    order = torch.randperm(len(common), generator=torch.Generator().manual_seed(1))
    return common[order.repeat(-(-cfg.num_tokens // len(common)))[:cfg.num_tokens]]


def inject(model: nn.Module, cfg: TriggerTokensConfig) -> nn.Module:
    embedding = model.get_input_embeddings()
    allowed = usable_token_ids(model, words_only=True)
    if not len(allowed):
        raise UserError(f"method trigger_tokens: the tokenizer of {model.config._name_or_path} has no word tokens "
                        f"to search over; use soft_trigger_tokens")
    mask = torch.zeros(embedding.weight.shape[0], dtype=torch.bool)
    mask[allowed] = True
    device = embedding.weight.device
    source = DiscreteTriggers(initial_ids(model, cfg, allowed).to(device), cfg.position, mask.to(device),
                              model.get_input_embeddings)
    return install_prompts(model, source, SOURCE)


def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{SOURCE}.trigger_ids": model.get_submodule(SOURCE).trigger_ids}


METHOD = Method(
    name="trigger_tokens", summary="a few vocabulary tokens at a chosen position of the input, found by "
                                   "gradient-guided search (the model stays frozen; the task head trains)",
    config_cls=TriggerTokensConfig, inject=inject, merge=None, merge_hint=MERGE_HINT, tasks=TASKS,
    extra_state=extra_state, callbacks=lambda cfg, model: [TriggerSearchCallback(cfg, model)],
    paper="Wallace et al. 2019, Universal Adversarial Triggers; Shin et al. 2020, AutoPrompt")
