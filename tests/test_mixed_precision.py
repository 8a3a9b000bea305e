"""`train.bf16: true` over fp32 weights runs the model under autocast: every method's layers must train there."""
from __future__ import annotations

import pytest
import torch

from peftcli import runs
from peftcli.methods import METHODS
from peftcli.models import auto_class

from method_configs import lifecycle_config

CAUSAL = [name for name, m in METHODS.items() if "causal-lm" in m.tasks]


@pytest.mark.parametrize("name", CAUSAL)
def test_one_step_under_bf16_autocast(name, tiny_llama, tmp_path):
    cfg = lifecycle_config(name, METHODS[name], tiny_llama, "causal-lm", tmp_path)
    model = runs.prepare_model(auto_class("causal-lm").from_pretrained(tiny_llama), name, cfg)
    ids = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trained)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
