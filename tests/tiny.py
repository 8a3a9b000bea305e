"""Tiny random models and a word-level tokenizer built from configs, so tests run offline in seconds."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REVIEWS = REPO / "recipes" / "data" / "reviews"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def _vocab() -> list[str]:
    words = set()
    for path in REVIEWS.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            words.update(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()))
    extra = "below is an instruction that describes a task write response appropriately completes request".split()
    return SPECIALS + sorted(words | set(extra) | set("abcdefghijklmnopqrstuvwxyz0123456789#:.,!?"))


def make_tokenizer(kind: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    if kind == "bert":
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                       cls_token="[CLS]", sep_token="[SEP]")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(kind: str, folder: Path, num_labels: int = 2) -> Path:
    """Save a tiny random model + tokenizer to `folder`. kind: bert (sequence classification), bert-token
    (token classification) or llama (causal LM with biases, so BitFit has something to train)."""
    from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    tokenizer = make_tokenizer("bert" if kind.startswith("bert") else "llama")
    size = len(tokenizer)
    if kind.startswith("bert"):
        config = BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=256, num_labels=num_labels,
                            pad_token_id=tokenizer.pad_token_id)
        model = (BertForTokenClassification if kind == "bert-token" else BertForSequenceClassification)(config)
    else:
        config = LlamaConfig(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             attention_bias=True, mlp_bias=True, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
