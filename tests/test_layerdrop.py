"""LayerDrop: rate 0 is exactly the base model; layers really are skipped; pruning gives a plain smaller model."""
from __future__ import annotations

import pytest
import torch

from peftcli.training.layerdrop import LayerDrop, layer_stack, prune_layers
from peftcli.models.loading import auto_class
from peftcli.config.sections import LayerDropSection

from test_lifecycle import sample_inputs

TASKS = ["sequence-classification", "causal-lm"]


def _train_mode_logits(model, inputs, seed=0):
    torch.manual_seed(seed)  # dropout draws: identical streams unless LayerDrop draws extra numbers
    return model(**inputs).logits


@pytest.mark.parametrize("task", TASKS)
def test_rate_zero_is_exactly_the_base_model(task, tiny_models):
    base = auto_class(task).from_pretrained(tiny_models[task]).train()
    dropped = auto_class(task).from_pretrained(tiny_models[task]).train()
    LayerDrop(dropped, LayerDropSection(rate=0.0))
    inputs = sample_inputs(task)
    torch.testing.assert_close(_train_mode_logits(dropped, inputs), _train_mode_logits(base, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("task", TASKS)
def test_skipped_layers_are_identity_and_eval_is_untouched(task, tiny_models):
    model = auto_class(task).from_pretrained(tiny_models[task])
    reference = auto_class(task).from_pretrained(tiny_models[task]).eval()
    inputs = {k: v for k, v in sample_inputs(task).items() if k != "labels"}
    drop = LayerDrop(model, LayerDropSection(rate=0.999999))
    model.eval()
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)
    calls = []
    for layer in layer_stack(reference):
        layer.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    skipped = model(**inputs).logits
    for layer in layer_stack(reference):  # the reference with every layer made an identity
        layer.forward = lambda hidden_states, *a, **k: hidden_states
    torch.testing.assert_close(skipped, reference(**inputs).logits)
    assert drop.layer_rate(0) > 0.99


def test_depth_scaling_and_linear_schedule(tiny_bert):
    model = auto_class("sequence-classification").from_pretrained(tiny_bert)
    drop = LayerDrop(model, LayerDropSection(rate=0.2, depth_scaling="linear", schedule="linear"))
    assert drop.rate == 0.0
    drop.rate = 0.2
    assert drop.layer_rate(0) == pytest.approx(0.1) and drop.layer_rate(1) == pytest.approx(0.2)


@pytest.mark.parametrize("task", TASKS)
def test_pruned_model_saves_and_reloads_as_plain_hf(task, tiny_models, tmp_path):
    model = auto_class(task).from_pretrained(tiny_models[task]).eval()
    prune_layers(model, LayerDropSection(prune_layers="every_other"))
    assert len(layer_stack(model)) == 1 and model.config.num_hidden_layers == 1
    inputs = {k: v for k, v in sample_inputs(task).items() if k != "labels"}
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = auto_class(task).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, expected)


def test_cli_trains_with_layerdrop_and_exports_the_pruned_model(tiny_bert, tmp_path):
    import json

    import yaml

    from test_cli import invoke, write_recipe
    from tiny import REVIEWS

    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
            "limit": {"train": 32, "eval": 16}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "lora"}, data,
                          tmp_path / "run")
    raw = yaml.safe_load(recipe.read_text())
    raw["layerdrop"] = {"rate": 0.5, "schedule": "linear", "prune_layers": [0]}
    recipe.write_text(yaml.safe_dump(raw))
    assert invoke("train", recipe).exit_code == 0
    result = invoke("eval", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout.strip().splitlines()[-1])["accuracy"] <= 1
    assert invoke("merge-export", tmp_path / "run", "--out", tmp_path / "merged").exit_code == 0
    merged = auto_class("sequence-classification").from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 1 and len(layer_stack(merged)) == 1
