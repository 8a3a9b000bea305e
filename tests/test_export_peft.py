"""`peft export`: adapters in HF peft's layout load with `peft.PeftModel` (the oracle) and reproduce the run."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import test_lifecycle as lc
from peftcli.runs.folder import method_record, write_recipe
from peftcli.cli import app
from peftcli.methods.recipes import load_recipe
from tiny import REVIEWS
from peftcli.files import TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import save_trained

peft = pytest.importorskip("peft")
runner = CliRunner()


def make_run(tmp_path, folder, task, method: dict, before_save=None):
    """A finished run directory whose trained tensors are moved away from their init (as training would);
    `before_save(model)` can change more state (e.g. AdaLoRA's rank masks) before the run is saved."""
    out = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(folder), "task": task}, "data": {"train": str(REVIEWS / "train.jsonl")},
        "method": method, "train": {"output_dir": str(out)}}), encoding="utf-8")
    recipe = load_recipe(recipe_path)
    model = prepare_model(lc.load_base(folder, task), recipe.method_name, recipe.method)
    lc.perturb(model)
    if before_save is not None:
        before_save(model)
    labels = ["negative", "positive"] if task == "sequence-classification" else None
    out.mkdir()
    write_recipe(recipe, out)
    save_trained(model, out, method_record(recipe, model, labels))
    return out, lc.outputs(model.eval(), lc.sample_inputs(task))


def export(run, out, *extra):
    return runner.invoke(app, ["export", str(run), "--out", str(out), *extra])


def peft_outputs(folder, task, adapter_dir):
    model = peft.PeftModel.from_pretrained(lc.load_base(folder, task), str(adapter_dir)).eval()
    return lc.outputs(model, lc.sample_inputs(task))


CASES = {
    "lora": {"name": "lora", "r": 4},
    "lora-all-linear-rslora-patterns": {"name": "lora", "r": 4, "target_modules": "all-linear", "use_rslora": True,
                                        "rank_pattern": {r"layers?\.0\..*": 2},
                                        "alpha_pattern": {"[kv]_proj|key|value": 3}},
    "dora": {"name": "lora", "r": 4, "use_dora": True, "target_modules": "all-linear"},
    "pissa-dora": {"name": "lora", "r": 4, "init": "pissa", "use_dora": True},
    "lora-embedding": {"name": "lora", "r": 4, "target_modules": ["word_embeddings", "embed_tokens", "query",
                                                                  "q_proj"]},
    "ia3": {"name": "ia3"},
    "vera": {"name": "vera", "r": 16},
}


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_export_and_reproduces_outputs(case, task, tiny_models, tmp_path):
    folder = tiny_models[task]
    method = dict(CASES[case])
    if case == "lora-embedding":  # each tiny model has only one of the two embedding names
        method["target_modules"] = [t for t in method["target_modules"]
                                    if (t in ("word_embeddings", "query")) == (task == "sequence-classification")]
    run, expected = make_run(tmp_path, folder, task, method)
    result = export(run, tmp_path / "peft")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "ia3": "IA3", "vera": "VERA"}[method["name"]]
    if task == "sequence-classification":
        assert config["modules_to_save"] == ["bert.pooler", "classifier"]  # the whole head: pooler + classifier
        saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert {"base_model.model.classifier.weight", "base_model.model.bert.pooler.dense.weight"} <= set(saved)
    torch.testing.assert_close(peft_outputs(folder, task, tmp_path / "peft"), expected, rtol=1e-4, atol=1e-4)


def _prune_adalora_ranks(model):
    """Mask triplets off as the budget callback would: a different count per layer, one layer pruned to rank 0."""
    from peftcli.methods.adalora import adalora_modules

    with torch.no_grad():
        for i, module in enumerate(adalora_modules(model).values()):
            r = module.adalora_mask.numel()
            mask = torch.ones(r)
            mask[torch.randperm(r, generator=torch.Generator().manual_seed(i))[:i % r]] = 0.0
            if i == 1:
                mask.zero_()
            module.adalora_mask.copy_(mask)
            module.lora_E.add_(0.5)  # Λ starts at zero; make every kept triplet count


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
@pytest.mark.parametrize("targets", ["default", "all-linear"])
def test_adalora_exports_with_rank_pattern_and_reproduces_outputs(task, targets, tiny_models, tmp_path):
    folder = tiny_models[task]
    method = {"name": "adalora", "init_r": 6, "target_r": 3, "alpha": 5.0}
    if targets == "all-linear":
        method["target_modules"] = "all-linear"
    run, expected = make_run(tmp_path, folder, task, method, before_save=_prune_adalora_ranks)
    base_outputs = lc.outputs(lc.load_base(folder, task).eval(), lc.sample_inputs(task))
    assert not torch.allclose(base_outputs, expected, atol=1e-3)  # the adapter changes the outputs
    result = export(run, tmp_path / "peft")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 6 and config["lora_alpha"] == 5.0
    peft.AdaLoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})  # a valid peft config
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ranks = {k[:-len(".lora_E")]: sum(v) for k, v in config["rank_pattern"].items()}
    assert len(ranks) == len(config["target_modules"]) and 0 in ranks.values() and 6 in ranks.values()
    assert sorted(set(ranks.values())) != [6]
    for name, r in ranks.items():
        key = f"base_model.model.{name}"
        assert tensors[f"{key}.lora_E"].shape == (r, 1)
        assert tensors[f"{key}.lora_A"].shape[0] == r and tensors[f"{key}.lora_B"].shape[1] == r
    if task == "sequence-classification":
        assert config["modules_to_save"] == ["bert.pooler", "classifier"]
        assert {"base_model.model.classifier.weight", "base_model.model.bert.pooler.dense.weight"} <= set(tensors)
    loaded = peft.PeftModel.from_pretrained(lc.load_base(folder, task), str(tmp_path / "peft")).eval()
    layer = loaded.base_model.model.get_submodule(next(n for n, r in ranks.items() if 0 < r < 6))
    assert layer.lora_E["default"].shape[0] < 6 and float(layer.ranknum["default"]) == 6.0
    torch.testing.assert_close(lc.outputs(loaded, lc.sample_inputs(task)), expected, rtol=1e-4, atol=1e-4)


def test_conv1d_lora_exports_with_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(folder)
    run, expected = make_run(tmp_path, folder, "causal-lm", {"name": "lora", "r": 4, "use_dora": True,
                                                             "target_modules": ["c_attn", "mlp.c_proj"]})
    assert export(run, tmp_path / "peft").exit_code == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(peft_outputs(folder, "causal-lm", tmp_path / "peft"), expected, rtol=1e-4, atol=1e-4)


def test_methods_without_a_peft_equivalent_exit_2_and_tensors_work_for_them(tiny_bert, tmp_path):
    run, _ = make_run(tmp_path, tiny_bert, "sequence-classification", {"name": "bitfit"})
    result = export(run, tmp_path / "peft")
    assert result.exit_code == 2
    assert "no HF peft equivalent" in result.output and "--format tensors" in result.output
    result = export(run, tmp_path / "raw", "--format", "tensors")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "raw" / "method.json").read_bytes() == (run / "method.json").read_bytes()
    saved, exported = load_file(run / TENSORS), load_file(tmp_path / "raw" / TENSORS)
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)


def test_export_refuses_bad_arguments(tiny_bert, tmp_path):
    run, _ = make_run(tmp_path, tiny_bert, "sequence-classification", {"name": "ia3"})
    assert "--format 'onnx'" in export(run, tmp_path / "x", "--format", "onnx").output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    result = export(run, tmp_path / "full")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert export(run, run).exit_code == 2
    assert export(tmp_path / "nowhere", tmp_path / "y").exit_code == 2
