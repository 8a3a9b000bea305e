"""Behaviour of the additive methods beyond the lifecycle contract: counts, AdapterDrop, Fusion, AdaMix, LST."""
from __future__ import annotations

import json
import shutil

import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from method_configs import write_adapter_run
from peftcli.methods import adamix, adapter, adapter_fusion, lst
from peftcli.methods import bottleneck as bn
from peftcli.models.loading import auto_class
from runhelp import run_cli
from test_lifecycle import outputs, perturb, sample_inputs
from tiny import REVIEWS
from peftcli.files import TENSORS
from peftcli.methods.install import prepare_model

TASK = "sequence-classification"


def load(folder, name, cfg):
    return prepare_model(auto_class(TASK).from_pretrained(folder), name, cfg).eval()


def test_houlsby_parameter_count_matches_the_paper():
    """6 layers x 2 adapters x (2md + d + m), m = 64, d = 384 (Houlsby Sec. 2.1), plus the two LayerNorms."""
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    with torch.device("meta"):
        model = prepare_model(BertForSequenceClassification(config), "adapter",
                                   adapter.AdapterConfig(bottleneck_size=64))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    in_adapters = sum(v for n, v in trainable.items() if ".adapter." in n)
    assert in_adapters == 6 * 2 * adapter.adapter_params(384, 64) == 595_200
    norms = sum(v for n, v in trainable.items() if "LayerNorm" in n)
    assert norms == 6 * 2 * 2 * 384
    pfeiffer = prepare_model(BertForSequenceClassification(config).to("meta"), "adapter",
                                  adapter.AdapterConfig(variant="pfeiffer"))
    assert sum(p.numel() for n, p in pfeiffer.named_parameters() if ".adapter." in n) == \
        6 * adapter.adapter_params(384, 384 // 16)


def test_adapter_drop_skips_the_chosen_lower_layers(tiny_bert):
    model = load(tiny_bert, "adapter", adapter.AdapterConfig())
    perturb(model)
    model.train()
    for state in bn.drop_states(model):
        state.train_skip = 1  # what DropCallback draws for this step
    model(**sample_inputs(TASK)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".adapter." in n}
    assert all(g is None for n, g in grads.items() if ".layer.0." in n)
    assert all(g is not None for n, g in grads.items() if ".layer.1." in n)

    skipping = load(tiny_bert, "adapter_drop", adapter.AdapterDropConfig(drop_inference_layers=1))
    perturb(skipping)
    skipped = outputs(skipping, sample_inputs(TASK))
    with torch.no_grad():
        for name, p in skipping.named_parameters():
            if ".layer.0." in name and ".adapter.up." in name:
                p.zero_()  # the lowest layer's adapters now add nothing
    torch.testing.assert_close(outputs(skipping, sample_inputs(TASK)), skipped, rtol=0, atol=0)


def test_drop_callback_draws_within_range(tiny_bert):
    model = load(tiny_bert, "adapter_drop", adapter.AdapterDropConfig())
    [callback] = adapter.DROP_METHOD.callbacks(model_cfg := adapter.AdapterDropConfig(), model)
    assert model_cfg.drop_train_layers is None and callback.max_layers == 1  # all but the top of 2 layers
    drawn = set()
    for _ in range(50):
        callback.on_step_begin(None, None, None)
        drawn.add(bn.drop_states(model)[0].train_skip)
    assert drawn == {0, 1}


def test_fusion_keeps_source_adapters_frozen(tiny_bert, tmp_path):
    sources = [write_adapter_run(tiny_bert, TASK, tmp_path / f"s{i}", seed=i) for i in range(2)]
    model = load(tiny_bert, "adapter_fusion", adapter_fusion.AdapterFusionConfig([str(s) for s in sources]))
    frozen = {k: v.clone() for k, v in adapter_fusion.source_state(model).items()}
    first = load_file(str(sources[0] / TENSORS))
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if ".sources." in n)
    key = next(k for k in first if k.endswith("output.dense.adapter.down.weight"))
    torch.testing.assert_close(frozen[key.replace(".adapter.", ".adapter.sources.0.")], first[key])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    for _ in range(2):
        model(**sample_inputs(TASK)).loss.backward()
        optimizer.step()
    for key, value in adapter_fusion.source_state(model).items():
        torch.testing.assert_close(value, frozen[key], rtol=0, atol=0)


def test_fusion_run_evaluates_after_its_sources_are_deleted(tiny_bert, tmp_path):
    sources = [write_adapter_run(tiny_bert, TASK, tmp_path / f"s{i}", seed=i) for i in range(2)]
    out = tmp_path / "fusion"
    recipe = {"model": {"name_or_path": str(tiny_bert)},
              "data": {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"),
                       "limit": {"train": 16, "eval": 16}, "max_length": 32},
              "method": {"name": "adapter_fusion", "sources": [str(s) for s in sources]},
              "train": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 8,
                        "learning_rate": 1e-2, "use_cpu": True, "seed": 1}}
    (tmp_path / "fusion.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert (result := run_cli("train", str(tmp_path / "fusion.yaml"))).exit_code == 0, result.output
    assert (result := run_cli("eval", str(out), "--json")).exit_code == 0, result.output
    before = json.loads(result.stdout.strip().splitlines()[-1])

    for source in sources:
        shutil.rmtree(source)
    result = run_cli("eval", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1]) == before


def test_adamix_inference_equals_the_averaged_adapter(tiny_bert):
    model = load(tiny_bert, "adamix", adamix.AdaMixConfig())
    perturb(model)
    mixed = outputs(model, sample_inputs(TASK))
    for module in list(model.modules()):
        if isinstance(module, bn.AdaptedLinear):
            module.adapter = module.adapter.averaged()
    torch.testing.assert_close(outputs(model, sample_inputs(TASK)), mixed)


def test_lst_sends_no_gradient_into_the_backbone(tiny_models):
    for task, folder in tiny_models.items():
        model = prepare_model(auto_class(task).from_pretrained(folder), "lst", lst.LstConfig())
        perturb(model)
        backbone = [p for n, p in model.named_parameters() if "lst_side" not in n and (".layer." in n or
                    ".layers." in n or "embeddings" in n or "embed_tokens" in n)]
        for p in backbone:
            p.requires_grad_(True)  # even trainable, the backbone must receive nothing
        model.train()
        model(**sample_inputs(task)).loss.backward()
        assert all(p.grad is None for p in backbone), task
        assert all(p.grad is not None for n, p in model.named_parameters() if "lst_side" in n), task
