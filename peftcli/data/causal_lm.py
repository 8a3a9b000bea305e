"""Causal-LM SFT examples: alpaca, chat messages, prompt/response and plain text, with prompt tokens masked."""
from __future__ import annotations

from .columns import require_columns
from ..errors import UserError
from ..config.sections import DataSection

IGNORE = -100


class Features(list):
    """Tokenised examples plus how many rows were dropped and why."""

    dropped: dict[str, int]


def detect_format(rows: list[dict], section: DataSection) -> str:
    if section.lm_format != "auto":
        return section.lm_format
    columns = set(rows[0])
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "messages" in columns:
        return "messages"
    if section.prompt and section.response:
        return "prompt_response"
    if section.text in columns:
        return "text"
    raise UserError(f"data: cannot tell the causal-lm format from columns {sorted(columns)}; expected "
                    f"instruction/input/output (alpaca), messages, or '{section.text}' (plain text), or set "
                    f"data.prompt and data.response")


def encode_causal_lm(rows: list[dict], key: str, tokenizer, section: DataSection) -> Features:
    fmt = detect_format(rows, section)
    if fmt == "text":
        require_columns(rows, [section.text], key)
        features = _pack_text(rows, tokenizer, section)
    else:
        pairs = _prompt_response_pairs(rows, fmt, key, tokenizer, section)
        features = Features()
        features.dropped = {}
        for prompt, response in pairs:
            example = _encode_pair(prompt, response, tokenizer, section)
            if example is None:
                features.dropped["prompt fills max_length, no response tokens left"] = \
                    features.dropped.get("prompt fills max_length, no response tokens left", 0) + 1
            else:
                features.append(example)
    if not features:
        reasons = "; ".join(f"{n} rows: {why}" for why, n in features.dropped.items())
        raise UserError(f"{key}: no example has supervised tokens after masking ({reasons}); "
                        f"raise data.max_length")
    return features


def _prompt_response_pairs(rows, fmt, key, tokenizer, section: DataSection) -> list[tuple[str, str]]:
    """(prompt text, response text) per row, the prompt rendered with the chat template when there is one."""
    if fmt == "alpaca":
        require_columns(rows, ["instruction", "output"], key)
        conversations = [([{"role": "user", "content": _alpaca_user(r)}], str(r["output"])) for r in rows]
    elif fmt == "messages":
        require_columns(rows, ["messages"], key)
        conversations = [_split_messages(r["messages"], key, n) for n, r in enumerate(rows, start=1)]
    else:
        require_columns(rows, [section.prompt, section.response], key)
        conversations = [([{"role": "user", "content": str(r[section.prompt])}], str(r[section.response]))
                         for r in rows]
    if getattr(tokenizer, "chat_template", None):
        return [(tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True), answer)
                for history, answer in conversations]
    if fmt == "messages":
        raise UserError(f"{key}: chat 'messages' need a tokenizer with a chat template, and this one has none")
    return [(_alpaca_prompt(history[-1]["content"]), answer) for history, answer in conversations]


def _alpaca_user(row: dict) -> str:
    extra = str(row.get("input") or "").strip()
    return f"{row['instruction']}\n\n{extra}" if extra else str(row["instruction"])


def _alpaca_prompt(user: str) -> str:
    instruction, _, extra = user.partition("\n\n")
    return (f"Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "") +
            "### Response:\n")


def _split_messages(messages, key: str, number: int):
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"{key}: row {number}: 'messages' must be a list of {{role, content}} objects")
    if messages[-1].get("role") != "assistant":
        raise UserError(f"{key}: row {number}: the last message must be the assistant's (it is what is learned)")
    return messages[:-1], str(messages[-1].get("content", ""))


def _encode_pair(prompt: str, response: str, tokenizer, section: DataSection) -> dict | None:
    # Chat templates already render special tokens as text; a raw prompt gets the tokenizer's own (e.g. BOS).
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]  # teach the model to stop
    ids = (prompt_ids + response_ids)[: section.max_length]
    if len(prompt_ids) >= len(ids):
        return None
    labels = list(ids) if section.train_on_prompt else [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
    return {"input_ids": ids, "labels": labels}


def _pack_text(rows, tokenizer, section: DataSection) -> Features:
    """Plain text: concatenate documents (EOS between them) and cut into max_length blocks."""
    stream: list[int] = []
    for row in rows:
        stream.extend(tokenizer(str(row[section.text]), add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    block = section.max_length
    features = Features({"input_ids": stream[i:i + block], "labels": stream[i:i + block]}
                        for i in range(0, len(stream) - 1, block) if len(stream[i:i + block]) > 1)
    features.dropped = {}
    return features
