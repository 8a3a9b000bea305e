"""Every method trains under the Trainer's speed modes: bf16 autocast over fp32 weights (`train.bf16`) and
non-reentrant gradient checkpointing (`train.gradient_checkpointing`)."""
from __future__ import annotations

import pytest
import torch

from peftcli.methods import METHODS
from peftcli.models.loading import auto_class

from method_configs import lifecycle_config
from peftcli.methods.install import prepare_model

CAUSAL = [name for name, m in METHODS.items() if "causal-lm" in m.tasks]


@pytest.mark.parametrize("name", CAUSAL)
def test_one_step_under_bf16_autocast(name, tiny_llama, tmp_path):
    cfg = lifecycle_config(name, METHODS[name], tiny_llama, "causal-lm", tmp_path)
    model = prepare_model(auto_class("causal-lm").from_pretrained(tiny_llama), name, cfg)
    ids = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trained)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("name", CAUSAL)
def test_gradient_checkpointing_gives_the_same_gradients(name, tiny_llama, tmp_path):
    """Recomputing activations in backward must not change any gradient (stochastic methods are compared in
    eval mode, where their randomness is off, but with checkpointing still active)."""
    ids = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = lifecycle_config(name, METHODS[name], tiny_llama, "causal-lm", tmp_path / str(checkpointing))
        model = prepare_model(auto_class("causal-lm").from_pretrained(tiny_llama), name, cfg)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.eval()  # dropout/routing off; checkpointing in transformers follows the flag, not .training
            for module in model.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module.training = True  # HF layers only checkpoint in training mode
        else:
            model.eval()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for key, want in grads[0].items():
        torch.testing.assert_close(grads[1][key], want, rtol=1e-4, atol=1e-6)
