"""Distillation: alpha = 0 is plain training; the loss mixes task and temperature-scaled KL; runs end to end."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from peftcli.training.distill import DistillCallback, distill_loss
from peftcli.methods import METHODS
from peftcli.models.loading import auto_class
from peftcli.config.sections import DistillSection

from test_cli import invoke, write_recipe
from tiny import REVIEWS, build_tiny
from train_helpers import make_trainer
from peftcli.methods.install import prepare_model


def test_loss_formula():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    task = torch.tensor(0.7)
    t, s = (teacher / 2).softmax(-1), (student / 2).log_softmax(-1)
    kl = (t * (t.log() - s)).sum(-1).mean()
    torch.testing.assert_close(distill_loss(student, teacher, task, 0.25, 2.0), 0.75 * task + 0.25 * 4 * kl)
    assert distill_loss(teacher, teacher, task, 1.0, 3.0).abs() < 1e-6  # a perfect student has zero KL


def _trained_head(tiny_bert, tmp_path, cfg):
    torch.manual_seed(0)  # the same LoRA initialisation in every run
    trainer = make_trainer(tiny_bert, tmp_path, method="lora", max_steps=3, learning_rate=1e-2)
    if cfg is not None:
        with torch.random.fork_rng():  # leave the data order and dropout draws as in the plain run
            teacher = auto_class("sequence-classification").from_pretrained(tiny_bert)
            torch.nn.init.normal_(teacher.classifier.weight, std=2.0)  # a teacher that disagrees with the student
        trainer.add_callback(DistillCallback(trainer.model, teacher, cfg))
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_alpha_zero_equals_plain_training(tiny_bert, tmp_path):
    plain = _trained_head(tiny_bert, tmp_path / "a", None)
    zero = _trained_head(tiny_bert, tmp_path / "b", DistillSection(teacher="x", alpha=0.0))
    half = _trained_head(tiny_bert, tmp_path / "c", DistillSection(teacher="x", alpha=0.5))
    for name, value in plain.items():
        torch.testing.assert_close(zero[name], value, rtol=0, atol=0)
    assert any(not torch.equal(half[n], v) for n, v in plain.items())


def test_distill_from_a_run_directory_end_to_end(tiny_bert, tmp_path):
    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
            "limit": {"train": 32, "eval": 16}}
    teacher = tmp_path / "teacher"
    assert invoke("train", write_recipe(tmp_path / "t.yaml", tiny_bert, "sequence-classification",
                                        {"name": "full"}, data, teacher)).exit_code == 0
    recipe = write_recipe(tmp_path / "s.yaml", tiny_bert, "sequence-classification", {"name": "lora"}, data,
                          tmp_path / "student")
    raw = __import__("yaml").safe_load(recipe.read_text())
    raw["distill"] = {"teacher": str(teacher), "alpha": 0.7, "temperature": 3.0}
    raw["layerdrop"] = {"rate": 0.2}  # the two recipe-level features compose with each other and any method
    recipe.write_text(__import__("yaml").safe_dump(raw))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert "accuracy" in json.loads((tmp_path / "student" / "metrics.json").read_text())


# The teacher sees the batch as the data collator made it: never the student's soft prompts, prefix cache or the
# masks and positions those methods rewrite (their forward pre-hooks run before the student's forward hooks).
STUDENTS = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
            "lora": {}}
MODELS = [("bert", "sequence-classification"), ("bert-token", "token-classification"), ("llama", "causal-lm"),
          ("llama", "sequence-classification")]


@pytest.fixture(scope="module")
def tiny_bert_token(tmp_path_factory):
    return build_tiny("bert-token", tmp_path_factory.mktemp("tiny-bert-token"))


class RecordingTeacher(torch.nn.Module):
    """The teacher, keeping the arguments of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.model(*args, **kwargs)


def _student_and_teacher(folder, task, method):
    torch.manual_seed(0)
    cfg = METHODS[method].config_cls(**STUDENTS[method])
    student = prepare_model(auto_class(task).from_pretrained(folder), method, cfg)
    teacher = auto_class(task).from_pretrained(folder)
    with torch.no_grad():  # a teacher that disagrees with the student
        head = teacher.get_output_embeddings() if task == "causal-lm" else getattr(teacher, "classifier", None)
        head = head if head is not None else teacher.score  # decoder classifiers call their head `score`
        torch.nn.init.normal_(head.weight, std=1.0)
    for model in (student, teacher):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the plain and the distilled forward give the same student logits
    return student.train(), teacher.eval()


def _batch(folder, task):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer(["a great film , i loved it", "bad"], padding=True, return_tensors="pt"))
    if task in ("causal-lm", "token-classification"):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, :2] = -100  # a prompt part without loss / a special token without a tag
        if task == "token-classification":
            labels = labels.where(labels == -100, labels % 2)
    else:
        labels = torch.tensor([1, 0])
    return {**batch, "labels": labels}


@pytest.mark.parametrize("method", list(STUDENTS))
@pytest.mark.parametrize("kind,task", MODELS, ids=["bert-cls", "bert-token", "llama-lm", "llama-cls"])
def test_teacher_sees_the_original_batch(kind, task, method, tiny_bert, tiny_bert_token, tiny_llama):
    folder = {"bert": tiny_bert, "bert-token": tiny_bert_token, "llama": tiny_llama}[kind]
    student, teacher = _student_and_teacher(folder, task, method)
    batch = _batch(folder, task)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = student(**batch)  # no distillation yet
    recorder = RecordingTeacher(teacher)
    callback = DistillCallback(student, recorder, DistillSection(teacher="x", alpha=0.5, temperature=2.0))
    callback.on_train_begin(None, None, None)
    try:
        out = student(**batch)
    finally:
        callback.on_train_end(None, None, None)

    (args, kwargs), = recorder.calls
    assert args == () and set(kwargs) == set(inputs)  # no inputs_embeds, no cache, no labels
    for key, value in inputs.items():
        assert torch.equal(kwargs[key], value), key
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    assert out.logits.shape == teacher_logits.shape == plain.logits.shape
    labels, mask = batch["labels"], None
    if task == "causal-lm":  # position i predicts token i + 1
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
    elif task == "token-classification":
        mask = labels != -100
    expected = distill_loss(plain.logits, teacher_logits, plain.loss, 0.5, 2.0, mask)
    torch.testing.assert_close(out.loss, expected)
    # after training the hooks are gone: the student's forward is its own again
    assert torch.equal(student(**batch).loss, plain.loss)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_causal_lm_distill_with_a_prompt_student_end_to_end(method, tiny_llama, tmp_path):
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w} and more {w}"}
            for w in ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy")]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    recipe = {"model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
              "data": {"train": str(data), "max_length": 32},
              "method": {"name": method, "num_virtual_tokens": 4},
              "distill": {"teacher": str(tiny_llama), "alpha": 0.5, "temperature": 2.0},
              "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                        "logging_steps": 1, "use_cpu": True}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = invoke("train", path)
    assert result.exit_code == 0, result.output
