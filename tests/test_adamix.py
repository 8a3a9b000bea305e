"""AdaMix training: two stochastic passes of the whole model per step and their symmetric-KL consistency loss."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import TrainingArguments

from peftcli.methods import adamix
from peftcli.models.loading import auto_class
from peftcli.training.trainer import PeftTrainer
from test_lifecycle import perturb, sample_inputs
from peftcli.methods.install import prepare_model

SEQ, LM = "sequence-classification", "causal-lm"


def adamix_model(folder, task=SEQ, weight=1.0, lora=False, **load):
    name, cfg = (("adamix_lora", adamix.AdaMixLoraConfig(consistency_weight=weight)) if lora else
                 ("adamix", adamix.AdaMixConfig(consistency_weight=weight)))
    model = prepare_model(auto_class(task).from_pretrained(folder, **load), name, cfg)
    perturb(model)  # LoRA experts start at B = 0: identical routes would hide the consistency term
    return model.train()


def trainer_for(model, tmp_path, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False,
                             label_names=["labels"])
    return PeftTrainer(model=model, args=args, **kwargs)


def count_passes(model) -> list[int]:
    passes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: passes.append(len(passes)))
    return passes


def sym_kl(logits1, logits2):
    """½ (KL(p1 || p2) + KL(p2 || p1)) per row, written out from the definition."""
    p, q = F.softmax(logits1.float(), -1), F.softmax(logits2.float(), -1)
    return 0.5 * ((p * (p.log() - q.log())).sum(-1) + (q * (q.log() - p.log())).sum(-1))


def seeded_passes(model, inputs, seed=0):
    """The two forwards the training step should make, replayed from the same seed: pass 1 with its task loss."""
    torch.manual_seed(seed)
    first = model(**inputs)
    second = model(**{k: v for k, v in inputs.items() if k != "labels"})
    return first, second


@pytest.mark.parametrize("lora", [False, True], ids=["adapter", "lora"])
def test_loss_is_the_first_pass_task_loss_plus_weighted_symmetric_kl_of_two_passes(tiny_bert, tmp_path, lora):
    model = adamix_model(tiny_bert, weight=0.7, lora=lora)
    trainer, inputs = trainer_for(model, tmp_path), sample_inputs(SEQ)
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(inputs))
    first, second = seeded_passes(model, inputs)
    kl = sym_kl(first.logits, second.logits).mean()
    assert kl > 1e-6  # the passes differ, so the term is really there
    torch.testing.assert_close(loss, first.loss + 0.7 * kl)


def test_the_per_site_aux_loss_is_gone(tiny_bert):
    model = adamix_model(tiny_bert)
    assert not any(hasattr(m, "peft_aux_loss") for m in model.modules())


def test_the_two_passes_take_different_routes(tiny_bert, tmp_path, monkeypatch):
    model = adamix_model(tiny_bert)
    passes, routes = count_passes(model), {}
    original = adamix.Experts.route

    def recording(self):
        routes.setdefault(passes[-1], []).append(original(self))
        return routes[passes[-1]][-1]

    monkeypatch.setattr(adamix.Experts, "route", recording)
    trainer = trainer_for(model, tmp_path)
    torch.manual_seed(0)
    trainer.compute_loss(model, sample_inputs(SEQ))
    sites = sum(isinstance(m, adamix.Experts) for m in model.modules())
    assert sorted(routes) == [0, 1] and all(len(r) == sites for r in routes.values())
    assert routes[0] != routes[1]


@pytest.mark.parametrize("weight,forwards", [(0.0, 1), (1.0, 2)])
def test_one_forward_per_step_without_consistency(tiny_bert, tmp_path, weight, forwards):
    model = adamix_model(tiny_bert, weight=weight)
    passes, inputs = count_passes(model), sample_inputs(SEQ)
    trainer = trainer_for(model, tmp_path)
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(inputs))
    assert len(passes) == forwards
    if not weight:
        torch.manual_seed(0)
        torch.testing.assert_close(loss, model(**inputs).loss)


def test_gradients_reach_the_experts_of_both_passes(tiny_bert, tmp_path, monkeypatch):
    """Pass 1 routes through expert 0 everywhere, pass 2 through expert 1: the task loss sees only pass 1, so
    expert 1's gradient can only come through the consistency term; experts 2 and 3 are never used."""
    model = adamix_model(tiny_bert)
    passes = count_passes(model)
    monkeypatch.setattr(adamix.Experts, "route", lambda self: (passes[-1], passes[-1]))
    trainer_for(model, tmp_path).compute_loss(model, sample_inputs(SEQ)).backward()
    experts = [m for m in model.modules() if isinstance(m, adamix.Experts)]
    for module in experts:
        for weight in (module.down_weight, module.up_weight):
            used = weight.grad.flatten(1).abs().sum(1)
            assert used[0] > 0 and used[1] > 0, "an expert of one pass got no gradient"
            assert used[2] == 0 and used[3] == 0


def test_regression_head_uses_the_squared_difference_of_the_two_outputs(tiny_bert, tmp_path):
    model = adamix_model(tiny_bert, num_labels=1, ignore_mismatched_sizes=True)
    inputs = {**sample_inputs(SEQ), "labels": torch.tensor([0.3, -1.2])}
    trainer = trainer_for(model, tmp_path)  # before seeding: the Trainer seeds the generator itself
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(inputs))
    first, second = seeded_passes(model, inputs)
    torch.testing.assert_close(loss, first.loss + F.mse_loss(first.logits, second.logits))


def test_causal_lm_compares_the_positions_its_loss_counts_and_skips_the_chunked_loss(tiny_llama, tmp_path):
    model = adamix_model(tiny_llama, LM, weight=0.5, lora=True)
    trainer = trainer_for(model, tmp_path, chunked_loss=True)
    assert trainer._loss_head is None  # the consistency term needs the logits
    inputs = sample_inputs(LM)
    inputs["labels"][0, :4] = -100  # a prompt the loss skips
    inputs["labels"][inputs["attention_mask"] == 0] = -100
    counted = inputs["labels"][:, 1:] != -100  # position i predicts token i + 1
    tokens = int(counted.sum())
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(tokens))
    torch.manual_seed(0)
    first = model(**inputs, num_items_in_batch=torch.tensor(tokens))
    second = model(**{k: v for k, v in inputs.items() if k != "labels"})
    kl = sym_kl(first.logits[:, :-1], second.logits[:, :-1])[counted].sum() / tokens
    assert kl > 1e-6
    torch.testing.assert_close(loss, first.loss + 0.5 * kl)

