"""Virtual tokens spliced into the input embeddings: masks, labels and token types follow; generate works too."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .prefix import _Paused, allow_checkpointing_with_prefix, cached, is_causal, main_input

IGNORE = -100
# Lester et al. 2021, Sec. 3.2: vocabulary init samples from the 5,000 most common tokens; BPE/WordPiece vocabularies
# list frequent pieces first, so the lowest ids stand in for "most common".
COMMON_TOKENS = 5000


class PromptSource(nn.Module):
    """What an input-prompt method provides: `groups`, [(position, count)] left to right, and `embeddings()`,
    the [sum of counts, hidden] virtual token embeddings in group order.
    position: int k >= 0 inserts after the input's first k tokens, k < 0 before its last -k tokens, "end" after
    its last token (padding excluded)."""

    groups: list[tuple[int | str, int]]

    def embeddings(self) -> torch.Tensor:
        raise NotImplementedError


def insertion_index(mask: torch.Tensor, position: int | str) -> torch.Tensor:
    """Per row, the column where virtual tokens go, counted within the row's real (unpadded) tokens."""
    length = mask.shape[1]
    first = mask.argmax(1)
    end = length - mask.flip(1).argmax(1)  # one past the last real token
    if position == "end":
        return end
    if position >= 0:
        return torch.minimum(first + position, end)
    return torch.maximum(end + position, first)


def splice(seq: torch.Tensor, block: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Insert `block` [B, P, ...] into `seq` [B, L, ...] at column `at` [B] of each row."""
    tokens, length = block.shape[1], seq.shape[1]
    j = torch.arange(length + tokens, device=seq.device).unsqueeze(0)
    at = at.unsqueeze(1)
    source = torch.where(j < at, j + tokens, torch.where(j < at + tokens, j - at, j))
    both = torch.cat([block, seq], dim=1)
    if both.dim() == 3:
        source = source.unsqueeze(-1).expand(-1, -1, both.shape[-1])
    return both.gather(1, source)


def with_prompts(model: nn.Module, source: PromptSource, kwargs: dict) -> tuple[dict, torch.Tensor]:
    """Forward kwargs with the virtual tokens inserted: inputs_embeds, attention_mask, token-level labels (never
    supervised) and token_type_ids (segment 0) all grow by the prompt length. Also returns, per row, the columns
    that hold the input's own tokens (to cut per-token outputs back to the input's length)."""
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    batch, length = embeds.shape[:2]
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device) if mask is None else mask
    labels, types = kwargs.get("labels"), kwargs.get("token_type_ids")
    token_labels = labels is not None and labels.dim() == 2 and labels.shape[1] == length
    prompts = source.embeddings().to(embeds.dtype)
    real = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)  # which columns are input tokens
    ends = torch.tensor([c for _, c in source.groups]).cumsum(0).tolist()
    for (position, count), end in reversed(list(zip(source.groups, ends))):
        at = insertion_index(mask, position)
        embeds = splice(embeds, prompts[end - count:end].unsqueeze(0).expand(batch, -1, -1), at)
        if token_labels:
            labels = splice(labels, labels.new_full((batch, count), IGNORE), at)
        if types is not None:
            types = splice(types, types.new_zeros(batch, count), at)
        mask = splice(mask, mask.new_ones(batch, count), at)
        real = splice(real, real.new_zeros(batch, count), at)
    kwargs.update(inputs_embeds=embeds, attention_mask=mask)
    if token_labels:
        kwargs["labels"] = labels
    if types is not None:
        kwargs["token_type_ids"] = types
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = positions_from_mask(mask)
    if is_causal(model) and type(model).__name__.endswith("ForSequenceClassification"):
        kwargs = pad_left(kwargs)
    return kwargs, torch.argsort((~real).int(), dim=1, stable=True)[:, :length]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_left(kwargs: dict) -> dict:
    """Decoder classifiers pool the last position when given embeddings: move padding to the left (with explicit
    positions, so nothing else changes) so that the last position is the last real token."""
    mask = kwargs["attention_mask"]
    order = torch.argsort(mask.long(), dim=1, stable=True)
    kwargs["inputs_embeds"] = kwargs["inputs_embeds"].gather(
        1, order.unsqueeze(-1).expand(-1, -1, kwargs["inputs_embeds"].shape[-1]))
    kwargs["attention_mask"] = mask.gather(1, order)
    kwargs["position_ids"] = positions_from_mask(kwargs["attention_mask"])
    return kwargs


def install_prompts(model: nn.Module, source: PromptSource, attr: str) -> nn.Module:
    """Register `source` as `model.<attr>` and splice its virtual tokens into every forward and `model.generate`."""
    model.add_module(attr, source)
    paused = _Paused()

    kept: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        kept.clear()
        past = cached(kwargs)
        if paused.on or (past is not None and past.get_seq_length() > 0):
            return None  # our generate already spliced them in, or a cached continuation step
        kwargs, _ = main_input(args, kwargs)
        kwargs, columns = with_prompts(module, source, kwargs)
        kept.append(columns)
        return (), kwargs

    def cut_outputs(module, args, kwargs, output):
        """Per-token logits come back at the input's length: the virtual positions are dropped (after the loss,
        which never counts them)."""
        logits = getattr(output, "logits", None)
        if kept and logits is not None and logits.dim() == 3:
            columns = kept.pop()
            output.logits = logits.gather(1, columns.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return output

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model.register_forward_hook(cut_outputs, with_kwargs=True)
    allow_checkpointing_with_prefix(model)
    if is_causal(model) and hasattr(model, "generate"):
        model.generate = _prompt_generate(model, source, paused)
    return model


def _prompt_generate(model: nn.Module, source: PromptSource, paused: _Paused):
    """`model.generate` from prompted embeddings; returns input_ids + new tokens like transformers does."""
    base_generate = type(model).generate

    def generate(input_ids=None, attention_mask=None, **kwargs):
        with torch.no_grad():
            inputs, _ = with_prompts(model, source, {"input_ids": input_ids, "attention_mask": attention_mask})
        with paused():
            out = base_generate(model, inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                **kwargs)
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences], dim=1)
        return out

    return generate


def init_embeddings(model: nn.Module, count: int, init: str, text: str | None, seed: int = 0) -> torch.Tensor:
    """[count, hidden] initial virtual tokens: random (normal, scaled like the vocabulary), sampled common
    vocabulary embeddings, or the embeddings of `text` repeated to fill `count` (Lester et al. 2021, Sec. 3.2)."""
    table = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    if init == "random":
        std = 0.02 if table.is_meta else float(table.detach().float().std())
        return torch.randn(count, table.shape[1], generator=generator).to(table.device) * std
    if init == "vocab":
        common = usable_token_ids(model)[:COMMON_TOKENS]
        ids = common[torch.randint(0, len(common), (count,), generator=generator)]
    else:
        ids = text_ids(model, text)
        ids = ids.repeat(-(-count // len(ids)))[:count]
    return table.detach()[ids.to(table.device)].float().clone()


def usable_token_ids(model: nn.Module, words_only: bool = False) -> torch.Tensor:
    """Ascending vocabulary ids a prompt may start from (or a discrete trigger may become): rows of the embedding
    table the tokenizer really uses, never its special tokens nor [unusedN] / <unusedN> placeholders (untrained
    rows). words_only keeps alphabetic pieces alone. Without a tokenizer, only the config's special ids go."""
    rows = model.get_input_embeddings().weight.shape[0]
    try:
        tokenizer = own_tokenizer(model)
    except (OSError, ValueError, TypeError):
        special = {i for key in SPECIAL_ID_KEYS for i in _as_list(getattr(model.config, key, None))}
        return torch.tensor([i for i in range(rows) if i not in special])
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    keep = [i for token, i in tokenizer.get_vocab().items()
            if i < rows and i not in special and not UNUSED_TOKEN.fullmatch(token)
            and (not words_only or WORD_MARKS.sub("", token).isalpha())]
    return torch.tensor(sorted(keep))


# Special-token ids a config may name, for models whose folder holds no tokenizer.
SPECIAL_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                   "unk_token_id", "mask_token_id", "decoder_start_token_id")
# BERT's [unused0]..[unused993] and Gemma's <unused0>.. are reserved rows that pre-training never trained.
UNUSED_TOKEN = re.compile(r"\[unused\d+\]|<unused\d+>", re.IGNORECASE)
# Sub-word markers: WordPiece continuation (##), byte-level BPE space (Ġ), SentencePiece space (▁).
WORD_MARKS = re.compile(r"^(##|\u0120|\u2581)")


def _as_list(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else [int(v) for v in value]


def own_tokenizer(model: nn.Module):
    """The model's own tokenizer (found next to its weights); raises OSError / ValueError when there is none."""
    from transformers import AutoTokenizer

    folder = Path(model.config._name_or_path)
    ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    has_own = folder.is_dir() and any(folder.glob("tokenizer*"))
    # a GGUF-only folder carries its tokenizer inside the .gguf file
    extra = {"gguf_file": ggufs[0].name} if ggufs and not has_own else {}
    return AutoTokenizer.from_pretrained(str(folder), **extra)


def text_ids(model: nn.Module, text: str) -> torch.Tensor:
    """Token ids of `text` with the model's own tokenizer."""
    try:
        tokenizer = own_tokenizer(model)
    except (OSError, ValueError) as exc:
        folder = model.config._name_or_path
        raise UserError(f"method.init_text: cannot load the tokenizer of {folder} to encode it ({exc}); use "
                        f"init: vocab") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"method.init_text: {text!r} encodes to no tokens; give some words or use init: vocab")
    return torch.tensor(ids)
