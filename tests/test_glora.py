"""GLoRA: every path choice merges exactly, config checks, the evolutionary search, supernet -> search -> train."""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from peftcli.errors import UserError
from peftcli.glora_search import SearchOptions, config_params, evolve
from peftcli.methods.glora import CHOICES, GloraConfig, GloraLinear, validate
from peftcli.recipe import load_recipe
from runhelp import run_cli
from tiny import REVIEWS


def perturbed(layer: GloraLinear) -> GloraLinear:
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("seed", range(6))
def test_every_path_combination_merges_exactly(seed):
    rng = random.Random(seed)
    path = {part: rng.choice(choices) for part, choices in CHOICES.items()}
    base = torch.nn.Linear(12, 6)
    base.requires_grad_(False)
    layer = perturbed(GloraLinear(base, r=3, path=path, supernet=False))
    x = torch.randn(4, 12)
    if any(c != "none" for c in path.values()):
        assert not torch.allclose(layer(x), base(x))
    torch.testing.assert_close(layer.merged()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_layer_without_bias_keeps_its_layout():
    layer = perturbed(GloraLinear(torch.nn.Linear(8, 4, bias=False), r=2, path={
        "A": "lora", "B": "vector", "C": "lora", "D": "vector", "E": "scalar"}, supernet=False))
    assert layer.path["C"] == layer.path["D"] == layer.path["E"] == "none"
    assert layer.merged().bias is None


def test_supernet_shares_weights_and_samples_paths():
    layer = GloraLinear(torch.nn.Linear(8, 4), r=2, path={}, supernet=True).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(2, 8)
    outputs = {tuple(layer(x).flatten().tolist()) for _ in range(30)}
    assert len(outputs) > 5  # paths are sampled per forward in training
    layer.eval()
    torch.testing.assert_close(layer(x), layer.merged()(x))  # evaluation: the full paths, every time
    assert layer.path == {"A": "lora", "B": "lora", "C": "lora", "D": "vector", "E": "vector"}
    assert layer.glora_A_d.shape == (4, 2) and layer.glora_D_d.shape == (4, 1)


def test_config_errors_name_the_key():
    assert validate(GloraConfig(paths={"x": {"A": "lora"}})) is None
    assert "paths.x: unknown component 'Z'" in validate(GloraConfig(paths={"x": {"Z": "lora"}}))
    assert "choose one of" in validate(GloraConfig(default_path={"D": "lora"}))
    assert "remove paths" in validate(GloraConfig(supernet=True, paths={"x": {"A": "none"}}))


def test_evolution_finds_the_best_config_within_budget():
    modules = {f"l{i}": GloraLinear(torch.nn.Linear(8, 8), 2, {}, True) for i in range(3)}
    # Best: A = scalar everywhere and everything else none.
    def score(config):
        return sum((p["A"] == "scalar") + sum(p[c] == "none" for c in "BCDE") for p in config.values())
    options = SearchOptions(population=20, generations=30, mutation=0.1, max_params=200, seed=0)
    best, value, history = evolve(modules, score, options)
    # Random configurations score about 4 of 15 here; evolution gets (near) the optimum.
    assert value >= 13 and config_params(modules, best) <= 200
    assert [h["best"] for h in history] == sorted(h["best"] for h in history)


def test_supernet_search_then_train(tiny_bert, tmp_path):
    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
            "limit": {"train": 32, "eval": 16}}
    train = {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "use_cpu": True, "seed": 1}
    recipe = {"model": {"name_or_path": str(tiny_bert)}, "data": data,
              "method": {"name": "glora", "r": 2, "supernet": True}, "train": {"output_dir": str(tmp_path / "sup"),
                                                                               **train}}
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert run_cli("train", str(tmp_path / "sup.yaml")).exit_code == 0
    found = tmp_path / "searched.yaml"
    result = run_cli("glora-search", str(tmp_path / "sup"), "--out", str(found), "--population", "3",
                     "--generations", "2", "--limit", "8", "--output-dir", str(tmp_path / "fine"))
    assert result.exit_code == 0, result.output
    searched = load_recipe(found)
    assert searched.method.supernet is False and len(searched.method.paths) == 4  # 2 layers x query, value
    assert json.loads(found.with_suffix(".search.json").read_text())["paths"] == searched.method.paths
    result = run_cli("train", str(found), "--set", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert run_cli("merge-export", str(tmp_path / "fine"), "--out", str(tmp_path / "merged")).exit_code == 0
    bad = run_cli("glora-search", str(tmp_path / "fine"), "--out", str(tmp_path / "x.yaml"), "--max-params", "1")
    assert bad.exit_code == 2 and "--max-params" in bad.output


def test_paths_for_unknown_layers_are_a_user_error(tiny_bert):
    from peftcli import runs
    import test_lifecycle as lc

    with pytest.raises(UserError, match="not an adapted layer"):
        runs.prepare_model(lc.load_base(tiny_bert, "sequence-classification"), "glora",
                           GloraConfig(paths={"bert.nope": {"A": "none"}}))
