"""Turning rows into model features per task (labels, prompts, loss masks) and batching them."""
from __future__ import annotations

import dataclasses

from .columns import label_ids, require_columns
from ..errors import UserError
from ..config.sections import DataSection, ModelSection

IGNORE = -100  # label value the HF losses skip
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclasses.dataclass
class Prepared:
    train: list[dict]
    eval: list[dict] | None
    labels: list[str] | None  # class names in id order (classification); None for LM / regression
    dropped: dict[str, int]   # reason -> rows dropped


def infer_labels(rows: list[dict], column: str, model: ModelSection) -> list[str] | None:
    """Label names in id order: from the recipe, else sorted from the data (numerically if all integers)."""
    if model.labels:
        return list(model.labels)
    if model.num_labels == 1:
        return None  # regression
    values = sorted({str(v) for row in rows for v in _as_list(row[column])})
    if all(_is_int(v) for v in values):
        values = sorted(values, key=int)
    if len(values) < 2:
        raise UserError(f"data.train: column '{column}' has a single label value {values}; classification needs "
                        f"at least two (for regression set model.num_labels: 1)")
    return values


def prepare(task: str, tokenizer, section: DataSection, model: ModelSection, train: list[dict],
            evaluation: list[dict] | None, labels: list[str] | None = None) -> Prepared:
    """Tokenise both splits. `labels` fixes the label order (from a finished run) instead of inferring it."""
    if section.packing and task != "causal-lm":
        raise UserError(f"data.packing: padding-free packing is for causal-lm SFT; task '{task}' pads each batch "
                        f"(use train.train_sampling_strategy: group_by_length to cut padding instead)")
    if task == "sequence-classification":
        require_columns(train, [section.text, section.label] + ([section.text_pair] if section.text_pair else []),
                        "data.train")
        labels = labels if labels is not None else infer_labels(train, section.label, model)
        encode = lambda rows, key: _encode_classification(rows, key, tokenizer, section, labels)  # noqa: E731
    elif task == "token-classification":
        require_columns(train, [section.tokens, section.tags], "data.train")
        labels = labels if labels is not None else infer_labels(train, section.tags, model)
        encode = lambda rows, key: _encode_tokens(rows, key, tokenizer, section, labels)  # noqa: E731
    elif task == "causal-lm":
        from .causal_lm import encode_causal_lm

        encode = lambda rows, key: encode_causal_lm(rows, key, tokenizer, section)  # noqa: E731
        labels = None
    elif task == "image-classification":
        from .images import encode_images

        require_columns(train, [section.image, section.label], "data.train")
        labels = labels if labels is not None else infer_labels(train, section.label, model)
        encode = lambda rows, key: encode_images(rows, key, section.image, section.label, labels)  # noqa: E731
    else:
        raise UserError(f"model.task: '{task}' has no data pipeline yet; supported: sequence-classification, "
                        f"token-classification, causal-lm")
    dropped: dict[str, int] = {}
    train_features = encode(train, "data.train")
    eval_features = None
    if evaluation is not None:
        eval_features = encode(evaluation, "data.eval")
    for features in (train_features, eval_features):
        if features is not None:
            for reason, count in getattr(features, "dropped", {}).items():
                dropped[reason] = dropped.get(reason, 0) + count
    return Prepared(list(train_features), None if eval_features is None else list(eval_features), labels, dropped)


def _encode_classification(rows, key, tokenizer, section: DataSection, labels):
    require_columns(rows, [section.text, section.label] + ([section.text_pair] if section.text_pair else []), key)
    texts = [str(r[section.text]) for r in rows]
    pairs = [str(r[section.text_pair]) for r in rows] if section.text_pair else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=section.max_length)
    ids = label_ids(rows, section.label, labels, key)
    return [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             **({"token_type_ids": encoded["token_type_ids"][i]} if "token_type_ids" in encoded else {}),
             "labels": ids[i]} for i in range(len(rows))]


def _encode_tokens(rows, key, tokenizer, section: DataSection, labels):
    require_columns(rows, [section.tokens, section.tags], key)
    index = {name: i for i, name in enumerate(labels)}
    features = []
    for number, row in enumerate(rows, start=1):
        words, tags = row[section.tokens], row[section.tags]
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise UserError(f"{key}: row {number}: '{section.tokens}' and '{section.tags}' must be lists of "
                            f"equal length")
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=section.max_length)
        previous, label_ids = None, []
        for word in encoded.word_ids():
            # Only a word's first sub-token carries its tag (the others are ignored by loss and metrics).
            label_ids.append(IGNORE if word is None or word == previous else index[str(tags[word])])
            previous = word
        features.append({**{k: v for k, v in encoded.items()}, "labels": label_ids})
    return features


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False
