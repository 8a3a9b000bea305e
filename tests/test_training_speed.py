"""Training features for speed: gradient checkpointing, torch.compile of method layers, length-grouped batches."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from peftcli.methods.lora import LoraConfig
from peftcli.data.collators import make_collator
from peftcli.training.trainer import PeftTrainer
from tiny import make_tokenizer
from peftcli.methods.install import prepare_model


def lora_llama(folder, dropout=0.0):
    model = prepare_model(AutoModelForCausalLM.from_pretrained(folder), "lora",
                               LoraConfig(target_modules="all-linear", dropout=dropout))
    with torch.no_grad():  # B != 0 so gradients flow through every adapter into earlier layers
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_llama):
    ids = torch.randint(8, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    model = lora_llama(tiny_llama)
    want = grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    got = grads(model, ids)
    assert set(got) == set(want) and len(want) > 0
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_replays_the_same_dropout_mask(tiny_llama):
    """Recompute must reproduce the forward's dropout (non-reentrant checkpointing restores the RNG state)."""
    ids = torch.randint(8, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    model = lora_llama(tiny_llama, dropout=0.3)
    torch.manual_seed(11)
    want = grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(11)
    got = grads(model, ids)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7)


def test_lora_layers_compile(tiny_llama):
    """torch.compile traces the LoRA autograd function (aot_eager: the same graph capture inductor gets,
    without a C++ toolchain) and matches eager outputs and gradients."""
    torch._dynamo.reset()
    ids = torch.randint(8, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    model = lora_llama(tiny_llama)
    want = grads(model, ids)
    compiled = torch.compile(model, backend="aot_eager")
    compiled.zero_grad()
    compiled(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-7)


def test_group_by_length_sampler_works_with_list_datasets(tiny_bert, tmp_path):
    tokenizer = make_tokenizer("bert")
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (64,), generator=gen).tolist()
    data = [{"input_ids": [4] + [9] * (n - 2) + [5], "attention_mask": [1] * n, "labels": i % 2}
            for i, n in enumerate(lengths)]
    from transformers import AutoModelForSequenceClassification

    def padding(strategy):
        args = TrainingArguments(output_dir=str(tmp_path / strategy), per_device_train_batch_size=8, use_cpu=True,
                                 train_sampling_strategy=strategy, report_to="none", remove_unused_columns=False,
                                 seed=1)
        trainer = PeftTrainer(model=AutoModelForSequenceClassification.from_pretrained(tiny_bert), args=args,
                              train_dataset=data, data_collator=make_collator("sequence-classification", tokenizer))
        assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler) == (strategy == "group_by_length")
        batches = list(trainer.get_train_dataloader())
        assert sum(len(b["labels"]) for b in batches) == len(data)
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding("group_by_length") < 0.75 * padding("random")  # seed 1: 476 vs 836 padded positions
