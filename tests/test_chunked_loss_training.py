"""`model.chunked_loss`: training steps take the cross entropy from hidden states chunk by chunk, and every
causal-LM method gets the same loss and gradients as from the model's own full-logits loss."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from peftcli.workflows import train as commands
from peftcli.methods import METHODS
from peftcli.models.loading import auto_class
from peftcli.models.speedups import hidden_states_to_loss, install_chunked_loss

from method_configs import lifecycle_config
from peftcli.methods.install import prepare_model

CAUSAL = [name for name, m in METHODS.items() if "causal-lm" in m.tasks]


def _loss_and_grads(model, head, ids, labels, chunked: bool, autocast: bool = False):
    model.zero_grad()
    torch.manual_seed(0)  # stochastic methods (dropout, routing) draw the same numbers in both runs
    with hidden_states_to_loss(head if chunked else None), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(17)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", CAUSAL)
def test_every_causal_method_gets_the_models_loss_and_gradients(name, tiny_llama, tmp_path):
    cfg = lifecycle_config(name, METHODS[name], tiny_llama, "causal-lm", tmp_path)
    model = prepare_model(auto_class("causal-lm").from_pretrained(tiny_llama), name, cfg).train()
    head = install_chunked_loss(model)
    assert head is not None
    ids = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt part without loss
    plain_loss, plain_grads = _loss_and_grads(model, head, ids, labels, chunked=False)
    loss, grads = _loss_and_grads(model, head, ids, labels, chunked=True)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for key, want in plain_grads.items():
        torch.testing.assert_close(grads[key], want, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_matches_the_models_loss(tiny_llama):
    model = auto_class("causal-lm").from_pretrained(tiny_llama).train()
    head = install_chunked_loss(model)
    ids = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    plain, plain_grads = _loss_and_grads(model, head, ids, ids, chunked=False, autocast=True)
    loss, grads = _loss_and_grads(model, head, ids, ids, chunked=True, autocast=True)
    torch.testing.assert_close(loss, plain, rtol=1e-2, atol=1e-2)
    for key, want in plain_grads.items():
        assert grads[key].dtype == want.dtype
        torch.testing.assert_close(grads[key], want, rtol=5e-2, atol=5e-3)


def test_outside_the_loss_step_the_head_gives_logits(tiny_llama):
    model = auto_class("causal-lm").from_pretrained(tiny_llama).train()
    install_chunked_loss(model)
    ids = torch.randint(5, 50, (1, 6))
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_models_that_do_not_qualify_keep_their_loss(tiny_llama):
    model = auto_class("causal-lm").from_pretrained(tiny_llama)
    model.config.final_logit_softcapping = 30.0
    assert install_chunked_loss(model) is None
    model.config.final_logit_softcapping = None
    model.config.model_type = "some-new-arch"
    assert install_chunked_loss(model) is None


def _train(tiny_llama, tmp_path, name, chunked: bool):
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w} and more {w}"}
            for w in ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy")] * 2
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    recipe = {"model": {"name_or_path": str(tiny_llama), "task": "causal-lm", "chunked_loss": chunked},
              "data": {"train": str(data), "max_length": 32},
              "method": {"name": "lora", "target_modules": "all-linear"},
              "train": {"output_dir": str(tmp_path / name), "max_steps": 3, "per_device_train_batch_size": 4,
                        "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "logging_steps": 1, "seed": 3,
                        "use_cpu": True}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = commands.train(str(path))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in log if "loss" in row]


def test_peft_train_with_chunked_loss_follows_the_same_curve(tiny_llama, tmp_path, monkeypatch):
    """Gradient accumulation included: the Trainer's token-count normalisation reaches the chunked loss."""
    from peftcli.models.kernels import loss as loss_module

    calls = []
    real = loss_module.chunked_causal_lm_loss
    monkeypatch.setattr(loss_module, "chunked_causal_lm_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    chunked = _train(tiny_llama, tmp_path, "chunked", True)
    assert len(calls) == 3 * 2  # every micro-batch of every step
    plain = _train(tiny_llama, tmp_path, "plain", False)
    assert len(calls) == 6 and len(chunked) == len(plain) == 3
    for a, b in zip(chunked, plain):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
