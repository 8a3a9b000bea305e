"""GLoRA: every path choice merges exactly, config checks, ranks in the supernet, the evolutionary search, its
search split (never the eval split), supernet -> search -> train."""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from peftcli.methods.install import prepare_model
from peftcli.errors import UserError
from peftcli.data.readers import load_splits
from peftcli.workflows.glora_search import SearchOptions, config_params, evolve, path_params, search_split
from peftcli.methods.glora import CHOICES, GloraConfig, GloraLinear, validate
from peftcli.config.sections import DataSection
from peftcli.methods.recipes import load_recipe
from safetensors.torch import load_file
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


def test_supernet_samples_every_rank_from_leading_slices():
    layer = GloraLinear(torch.nn.Linear(8, 6), r=4, path={}, supernet=True, ranks=[1, 2, 4]).train()
    assert layer.choices()["A"] == ("lora1", "lora2", "lora4", "vector", "scalar", "none")
    assert layer.glora_A_d.shape == (6, 4) and layer.glora_A_u.shape == (4, 8)  # shared at the largest rank
    random.seed(0)
    drawn = {layer.sample_path()["B"] for _ in range(200)}
    assert {"lora1", "lora2", "lora4"} <= drawn
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    for k in (1, 2, 4):  # rank k reads the first k columns of d and rows of u (weight sharing)
        torch.testing.assert_close(layer.value("A", f"lora{k}"), layer.glora_A_d[:, :k] @ layer.glora_A_u[:k])
    path = {"A": "lora1", "B": "lora2", "C": "none", "D": "none", "E": "none"}
    x = torch.randn(3, 8)
    random.seed(5)
    layer.sample_path = lambda: path  # the forward in training uses the sampled path, ranks included
    weight, bias = layer.effective(path)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias))


def test_path_params_count_the_rank():
    layer = GloraLinear(torch.nn.Linear(8, 6), r=4, path={}, supernet=True, ranks=[2, 4])
    none = {"C": "none", "D": "none", "E": "none"}
    assert path_params(layer, {"A": "lora2", "B": "none", **none}) == 2 * (6 + 8)
    assert path_params(layer, {"A": "lora4", "B": "lora", **none}) == 2 * 4 * (6 + 8)
    assert path_params(layer, {"A": "none", "B": "none", "C": "lora2", "D": "vector", "E": "scalar"}) \
        == 2 * (8 + 1) + 6 + 1


def test_chosen_ranks_train_from_the_supernet_slices(tmp_path):
    from peftcli.methods.glora import inherit
    from safetensors.torch import save_file

    base = torch.nn.Linear(8, 6)
    base.requires_grad_(False)
    supernet = torch.nn.Sequential(perturbed(GloraLinear(base, r=4, path={}, supernet=True, ranks=[1, 2, 4])))
    save_file({n: p.detach().contiguous() for n, p in supernet.named_parameters() if p.requires_grad},
              tmp_path / "adapter.safetensors")
    path = {"A": "lora2", "B": "lora1", "C": "lora4", "D": "vector", "E": "scalar"}
    fixed = torch.nn.Sequential(GloraLinear(base, r=4, path=path, supernet=False))
    assert fixed[0].glora_A_d.shape == (6, 2) and fixed[0].glora_B_u.shape == (1, 8)
    trainable = sum(p.numel() for p in fixed.parameters() if p.requires_grad)
    assert trainable == path_params(fixed[0], path)
    assert inherit(fixed, str(tmp_path / "adapter.safetensors")) == 8
    weight, bias = supernet[0].effective(path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fixed(x), torch.nn.functional.linear(x, weight, bias))  # the subnet, exactly
    torch.testing.assert_close(fixed[0].merged()(x), fixed(x), rtol=1e-5, atol=1e-5)


def trained_ranks(tensors: dict, paths: dict) -> None:
    """The saved tensors of a fine-tune hold exactly the chosen path of each component, at its rank."""
    for layer, path in paths.items():
        for part, choice in path.items():
            d = next((t for n, t in tensors.items() if n.endswith(f"{layer}.glora_{part}_d")), None)
            if choice == "none":
                assert d is None
            elif choice.startswith("lora"):
                u = next(t for n, t in tensors.items() if n.endswith(f"{layer}.glora_{part}_u"))
                assert d.shape[1] == u.shape[0] == int(choice[4:]), (layer, part, choice)
            else:
                assert d.shape[1] == 1 and (choice == "vector" or d.shape == (1, 1))


def rows_file(path, n: int, start: int = 0):
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(start, start + n)),
                    encoding="utf-8")
    return str(path)


def texts(rows) -> set[str]:
    return {r["text"] for r in rows}


def test_search_split_is_held_out_train_never_eval(tmp_path):
    train = rows_file(tmp_path / "train.jsonl", 40)
    section = DataSection(train=train, eval=str(tmp_path / "missing-eval.jsonl"), limit={"train": 30})
    rows, source = search_split(section, 42, SearchOptions(search_rows=100, seed=0))
    assert texts(rows) == {f"row {i}" for i in range(30, 40)}  # never read data.eval (it does not exist)
    assert source.startswith("10 train rows past data.limit.train (30)")
    sample, _ = search_split(section, 42, SearchOptions(search_rows=4, seed=3))
    assert sample == search_split(section, 42, SearchOptions(search_rows=4, seed=3))[0] and len(sample) == 4
    assert sample != search_split(section, 42, SearchOptions(search_rows=4, seed=4))[0]  # seeded, not a prefix
    carved = DataSection(train=train, eval_fraction=0.25, limit={"train": 20})
    rows, _ = search_split(carved, 7, SearchOptions(search_rows=100))
    trained, reported = load_splits(carved, 7)
    assert len(rows) == 10 and len(trained) == 20 and len(reported) == 10
    assert not texts(rows) & texts(trained) and not texts(rows) & texts(reported)


def test_search_split_from_a_file_and_its_errors(tmp_path):
    train, evaluation = rows_file(tmp_path / "train.jsonl", 20), rows_file(tmp_path / "dev.jsonl", 5, 100)
    with pytest.raises(UserError, match="data.limit.train: the supernet trained on every train row"):
        search_split(DataSection(train=train, eval=evaluation), 42, SearchOptions())
    section = DataSection(train=train, eval=evaluation)
    with pytest.raises(UserError, match="--search-data: .* is the supernet's data.eval"):
        search_split(section, 42, SearchOptions(search_data=evaluation))
    with pytest.raises(UserError, match="--search-data: .* does not exist"):
        search_split(section, 42, SearchOptions(search_data=str(tmp_path / "nope.jsonl")))
    rows, source = search_split(section, 42, SearchOptions(search_data=rows_file(tmp_path / "s.jsonl", 6, 50)))
    assert texts(rows) == {f"row {i}" for i in range(50, 56)} and source.startswith("6 --search-data")


def test_config_errors_name_the_key():
    assert validate(GloraConfig(paths={"x": {"A": "lora"}})) is None
    assert "paths.x: unknown component 'Z'" in validate(GloraConfig(paths={"x": {"Z": "lora"}}))
    assert "choose one of" in validate(GloraConfig(default_path={"D": "lora"}))
    assert "remove paths" in validate(GloraConfig(supernet=True, paths={"x": {"A": "none"}}))
    assert validate(GloraConfig(r=8, ranks=[2, 8], default_path={"A": "lora4", "C": "lora"})) is None
    assert "ranks: 16 is not in 1..r (8)" in validate(GloraConfig(r=8, ranks=[4, 16]))
    assert "paths.x.B: lora9 has rank 9, outside 1..r (8)" in validate(GloraConfig(r=8, paths={"x": {"B": "lora9"}}))
    assert "'lora2' is not a path of D" in validate(GloraConfig(default_path={"D": "lora2"}))


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
    evaluation = tmp_path / "validation.jsonl"
    evaluation.write_text((REVIEWS / "validation.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(evaluation), "max_length": 32,
            "limit": {"train": 32, "eval": 16}}
    train = {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "use_cpu": True, "seed": 1}
    recipe = {"model": {"name_or_path": str(tiny_bert)}, "data": data,
              "method": {"name": "glora", "r": 2, "ranks": [1, 2], "supernet": True},
              "train": {"output_dir": str(tmp_path / "sup"), **train}}
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert run_cli("train", str(tmp_path / "sup.yaml")).exit_code == 0
    evaluation.unlink()  # the reported split: the search must not need it
    found = tmp_path / "searched.yaml"
    result = run_cli("glora-search", str(tmp_path / "sup"), "--out", str(found), "--population", "3",
                     "--generations", "2", "--search-rows", "8", "--output-dir", str(tmp_path / "fine"))
    assert result.exit_code == 0, result.output
    assert "8 train rows past data.limit.train (32)" in result.output
    searched = load_recipe(found)
    assert searched.method.supernet is False and len(searched.method.paths) == 4  # 2 layers x query, value
    chosen = {c for path in searched.method.paths.values() for c in path.values()}
    assert chosen <= {"lora1", "lora2", "vector", "scalar", "none"}  # only the supernet's ranks
    assert "8 train rows past data.limit.train (32)" in found.read_text().splitlines()[1]
    record = json.loads(found.with_suffix(".search.json").read_text())
    assert record["paths"] == searched.method.paths and record["search_split"].startswith("8 train rows")
    evaluation.write_text((REVIEWS / "validation.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    result = run_cli("train", str(found), "--set", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    trained_ranks(load_file(tmp_path / "fine" / "adapter.safetensors"), searched.method.paths)
    assert run_cli("merge-export", str(tmp_path / "fine"), "--out", str(tmp_path / "merged")).exit_code == 0
    bad = run_cli("glora-search", str(tmp_path / "fine"), "--out", str(tmp_path / "x.yaml"), "--max-params", "1")
    assert bad.exit_code == 2 and "--max-params" in bad.output


def test_paths_for_unknown_layers_are_a_user_error(tiny_bert):
    import test_lifecycle as lc

    with pytest.raises(UserError, match="not an adapted layer"):
        prepare_model(lc.load_base(tiny_bert, "sequence-classification"), "glora",
                           GloraConfig(paths={"bert.nope": {"A": "none"}}))
