"""Text generation for causal-LM runs: prompts from eval data, batched left-padded decoding, `peft generate`."""
from __future__ import annotations

import dataclasses

import torch

from ..errors import UserError
from ..config.sections import DataSection


@dataclasses.dataclass
class GenerationSettings:
    max_new_tokens: int | None = None  # None: the recipe's eval.max_new_tokens
    do_sample: bool = False  # greedy by default: reproducible scores
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0

    def for_recipe(self, recipe) -> "GenerationSettings":
        if self.max_new_tokens is not None:
            return self
        return dataclasses.replace(self, max_new_tokens=recipe.eval.max_new_tokens)

    def config(self, tokenizer):
        from transformers import GenerationConfig

        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if self.do_sample else {}
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)


def render_prompt(tokenizer, text: str) -> str:
    """A user message as the model saw prompts in training: its chat template, else the Alpaca layout."""
    from ..data.causal_lm import _alpaca_prompt

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return _alpaca_prompt(text)


def prompt_reference_pairs(rows: list[dict], tokenizer, section: DataSection, key: str) -> list[tuple[str, str]]:
    """(rendered prompt, reference response) per eval row, exactly as training renders them."""
    from ..data.causal_lm import _prompt_response_pairs, detect_format

    fmt = detect_format(rows, section)
    if fmt == "text":
        raise UserError(f"{key}: plain-text data has no prompt/response pairs to generate from; generation metrics "
                        f"need alpaca, messages or prompt/response data (use loss/perplexity for plain text)")
    return _prompt_response_pairs(rows, fmt, key, tokenizer, section)


def _left_padded(tokenizer, prompts: list[str], max_prompt_tokens: int | None, device) -> dict:
    # Chat templates render special tokens as text already (as in lm_data._encode_pair).
    templated = bool(getattr(tokenizer, "chat_template", None))
    encoded = [tokenizer(p, add_special_tokens=not templated)["input_ids"] for p in prompts]
    if max_prompt_tokens:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]  # keep the end: it holds the question
    width = max(len(ids) for ids in encoded)
    # Left padding: every prompt ends at the last position, where decoding continues.
    input_ids = [[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded]
    mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded]
    return {"input_ids": torch.tensor(input_ids, device=device), "attention_mask": torch.tensor(mask, device=device)}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, batch_size: int = 8,
             max_prompt_tokens: int | None = None) -> list[str]:
    """Completions of `prompts` (new tokens only, special tokens dropped), `batch_size` prompts at a time."""
    model.eval()
    config = settings.config(tokenizer)
    torch.manual_seed(settings.seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = _left_padded(tokenizer, prompts[start:start + batch_size], max_prompt_tokens, model.device)
        tokens = model.generate(**batch, generation_config=config)
        new = tokens[:, batch["input_ids"].shape[1]:]
        out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out
