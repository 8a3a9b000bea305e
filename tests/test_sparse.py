"""Sparse fine-tuning: pruned weights stay zero through training and merge-export; N:M and Taylor masks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peftcli.methods.sparse import SparseConfig, achieved_sparsity, masked_layers, prune_mask

from test_cli import invoke, write_recipe
from tiny import REVIEWS
from train_helpers import make_trainer


def test_prune_mask_patterns():
    score = torch.rand(6, 8)
    assert prune_mask(score, SparseConfig(sparsity=0.25)).sum() == 36
    keep = prune_mask(score, SparseConfig(n_m=[2, 4]))
    assert torch.all(keep.reshape(-1, 4).sum(1) == 2)
    top = score.reshape(-1, 4).topk(2, dim=1).values.min(1).values
    assert torch.all(score.reshape(-1, 4)[keep.reshape(-1, 4)].reshape(-1, 2).min(1).values >= top)


@pytest.mark.parametrize("cfg", [SparseConfig(sparsity=0.6), SparseConfig(n_m=[2, 4]),
                                 SparseConfig(sparsity=0.5, score="taylor", calibration_batches=2)],
                         ids=["magnitude", "2:4", "taylor"])
def test_pruned_weights_stay_zero_through_training(cfg, tiny_bert, tmp_path):
    trainer = make_trainer(tiny_bert, tmp_path, method="sparse", cfg=cfg, max_steps=4, weight_decay=0.1,
                           learning_rate=1e-2)
    before = {id(m): m.weight.detach().clone() for m in masked_layers(trainer.model)}
    trainer.train()
    target = 0.5 if cfg.n_m else cfg.sparsity
    for layer in masked_layers(trainer.model):
        assert torch.all(layer.weight[~layer.sparse_mask] == 0)
        assert not torch.equal(layer.weight, before[id(layer)]), "kept weights did not train"
    assert achieved_sparsity(trainer.model) == pytest.approx(target, abs=0.01)
    assert json.loads((tmp_path / "sparsity.json").read_text())["achieved_sparsity"] == pytest.approx(target, abs=0.01)


def test_merge_export_writes_the_sparse_weights(tiny_bert, tmp_path):
    out = tmp_path / "run"
    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
            "limit": {"train": 32, "eval": 16}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification",
                          {"name": "sparse", "sparsity": 0.5}, data, out)
    assert invoke("train", recipe).exit_code == 0
    saved = load_file(str(out / "adapter.safetensors"))
    result = invoke("merge-export", out, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    masks = {k[: -len(".sparse_mask")]: v for k, v in saved.items() if k.endswith(".sparse_mask")}
    assert masks and not any(k.endswith("sparse_mask") for k in merged)
    for module, mask in masks.items():
        weight = merged[f"{module}.weight"]
        assert torch.all(weight[~mask] == 0) and (weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
