"""Distillation: alpha = 0 is plain training; the loss mixes task and temperature-scaled KL; runs end to end."""
from __future__ import annotations

import json

import torch

from peftcli.distill import DistillCallback, distill_loss
from peftcli.models import auto_class
from peftcli.recipe import DistillSection

from test_cli import invoke, write_recipe
from tiny import REVIEWS
from train_helpers import make_trainer


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
