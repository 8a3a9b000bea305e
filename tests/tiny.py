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


def build_tiny_vit(folder: Path, num_labels: int = 10) -> Path:
    """A tiny random ViT image classifier for 8x8 RGB images (the size of scikit-learn's digits)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    ViTForImageClassification(config).save_pretrained(folder)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 8, "width": 8}}), encoding="utf-8")
    return folder


def write_digits(folder: Path, per_class: int | None = None) -> Path:
    """scikit-learn's bundled 8x8 digits as PNGs in folder/{train,test}/<digit>/ (every 5th image is test)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[tuple[str, int], int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "test" if index % 5 == 0 else "train"
        seen = counts[split, label] = counts.get((split, label), 0) + 1
        if per_class and seen > per_class:
            continue
        target = Path(folder) / split / str(label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(target / f"{index:04d}.png")
    return Path(folder)


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
