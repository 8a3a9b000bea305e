"""Multi-task runs (data.tasks) and cross-layer sharing (method.share_across_layers), on tiny BERT and the demo
reviews: lifecycle through the CLI, batch sampling per strategy, separate heads, shared method tensors, resume."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftcli.data.multitask import TaskBatchSampler, TaskInfo
from peftcli.runs.folder import load_trained
from peftcli.errors import UserError
from peftcli.methods import METHODS
from peftcli.methods.lora import LoraConfig
from peftcli.models.loading import auto_class
from runhelp import run_cli, step_losses
from tiny import REVIEWS
from peftcli.files import FORMAT_VERSION, TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import load_tensors_into, save_trained

TASK = "sequence-classification"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A sentence-pair task with 4 labels (both reviews' sentiment initials) and a regression target."""
    folder = tmp_path_factory.mktemp("mt-data")
    for split, rows in (("train", 60), ("validation", 20)):
        reviews = [json.loads(line) for line in (REVIEWS / f"{split}.jsonl").read_text().splitlines()]
        with open(folder / f"pairs_{split}.jsonl", "w", encoding="utf-8") as handle:
            for i in range(rows):
                a, b = reviews[i % len(reviews)], reviews[(i * 7 + 3) % len(reviews)]
                handle.write(json.dumps({"s1": a["text"], "s2": b["text"], "rel": a["label"][0] + b["label"][0],
                                         "size": len(a["text"]) / 20}) + "\n")
    return folder


def write_recipe(folder, model, data, out, method=None, **train):
    """reviews (2 labels, 40 rows) + pairs (4 labels, 40) + size (regression, 24): 26 batches of 4 per epoch."""
    recipe = {
        "model": {"name_or_path": str(model)},
        "data": {"max_length": 32, "limit": {"train": 40, "eval": 16}, "sampling": "temperature", "tasks": {
            "reviews": {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl")},
            "pairs": {"train": str(data / "pairs_train.jsonl"), "eval": str(data / "pairs_validation.jsonl"),
                      "text": "s1", "text_pair": "s2", "label": "rel"},
            "size": {"train": str(data / "pairs_train.jsonl"), "eval": str(data / "pairs_validation.jsonl"),
                     "text": "s1", "label": "size", "num_labels": 1, "limit": {"train": 24, "eval": 16}}}},
        "method": method or {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
        "train": {"output_dir": str(out), "learning_rate": 3e-3, "num_train_epochs": 2,
                  "per_device_train_batch_size": 4, "logging_steps": 1, "seed": 3, "use_cpu": True,
                  "disable_tqdm": True, **train},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def test_lifecycle_train_eval_merge(tiny_bert, data, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_bert, data, out, eval_strategy="epoch", save_strategy="epoch",
                          load_best_model_at_end=True)
    result = run_cli("train", str(recipe))
    assert result.exit_code == 0, result.output
    final = json.loads((out / "metrics.json").read_text())
    assert {"reviews/accuracy", "reviews/f1", "pairs/accuracy", "pairs/f1", "size/pearson", "size/spearman",
            "macro/score"} <= set(final)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [row for row in logged if "eval_macro/score" in row]
    assert len(evals) == 2 and all("eval_pairs/accuracy" in row and "eval_loss" in row for row in evals)
    best = max(evals, key=lambda row: row["eval_macro/score"])  # load_best_model_at_end picks by macro/score
    assert final["macro/score"] == pytest.approx(best["eval_macro/score"], abs=1e-6)
    assert final["pairs/accuracy"] == pytest.approx(best["eval_pairs/accuracy"], abs=1e-6)

    record = json.loads((out / "method.json").read_text())
    assert [(t["name"], t["num_labels"]) for t in record["tasks"]] == [("reviews", 2), ("pairs", 4), ("size", 1)]
    assert record["tasks"][1]["labels"] == ["nn", "np", "pn", "pp"]
    tensors = load_file(out / "adapter.safetensors")
    assert tensors["classifier.heads.pairs.weight"].shape[0] == 4 and tensors["classifier.heads.size.weight"].shape[0] == 1

    result = run_cli("eval", str(out), "--json")
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again == pytest.approx(final, abs=1e-6)

    merged = tmp_path / "merged"
    assert run_cli("merge-export", str(out), "--out", str(merged)).exit_code == 0
    assert set(json.loads((merged / "tasks.json").read_text())) == {"reviews", "pairs", "size"}
    _, _, model, tokenizer = load_trained(out)
    batch = tokenizer(["great gloves", "a mess"], ["it works", "never again"], return_tensors="pt", padding=True)
    for index, name in enumerate(["reviews", "pairs", "size"]):
        plain = auto_class(TASK).from_pretrained(merged / name).eval()
        with torch.no_grad():
            want = model(**batch, task_ids=torch.tensor([index, index])).logits
            torch.testing.assert_close(plain(**batch).logits, want, rtol=1e-4, atol=1e-5)


def test_resume_mid_second_epoch_is_exact(tiny_bert, data, tmp_path):
    """Batches come from (seed, epoch) only: a run resumed at step 39 of 52 repeats the uninterrupted one."""
    reference = tmp_path / "reference"
    recipe = write_recipe(tmp_path, tiny_bert, data, reference, save_strategy="steps", save_steps=13,
                          method={"name": "lora", "r": 4, "target_modules": ["query", "value"], "dropout": 0.1})
    assert run_cli("train", str(recipe)).exit_code == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-39", resumed / "checkpoint-39")
    result = run_cli("train", str(recipe), "--output-dir", str(resumed), "--resume")
    assert result.exit_code == 0, result.output
    want, got = step_losses(reference), step_losses(resumed)
    assert len(want) == 52 and all(got[step] == want[step] for step in range(40, 53))
    reference_tensors, resumed_tensors = load_file(reference / TENSORS), load_file(resumed / TENSORS)
    for name, tensor in reference_tensors.items():
        assert torch.equal(resumed_tensors[name], tensor), name


def batches(strategy, sizes=(40, 12, 4), batch_size=4, temperature=1.0, seed=0, epoch=0):
    sampler = TaskBatchSampler(list(sizes), batch_size, strategy, temperature, seed)
    sampler.set_epoch(epoch)
    offsets = np.cumsum([0, *sizes[:-1]])
    task_of = lambda index: int(np.searchsorted(offsets, index, side="right") - 1)  # noqa: E731
    out = list(sampler)
    assert len(out) == len(sampler)
    for batch in out:
        assert len({task_of(i) for i in batch}) == 1, "a batch mixes tasks"
    return [(task_of(batch[0]), batch) for batch in out]


def test_proportional_is_one_pass_over_every_task():
    drawn = batches("proportional", sizes=(40, 13, 4))
    assert Counter(task for task, _ in drawn) == {0: 10, 1: 4, 2: 1}
    indices = sorted(i for _, batch in drawn for i in batch)
    assert indices == list(range(57)), "every row exactly once per epoch"
    assert [t for t, _ in drawn] != sorted(t for t, _ in drawn), "tasks are interleaved, not in blocks"


def test_temperature_frequencies_follow_sizes_to_the_power_one_over_t():
    sizes, temperature = (4000, 1000, 250), 2.0
    drawn = batches("temperature", sizes=sizes, temperature=temperature)
    counts = Counter(task for task, _ in drawn)
    expected = np.asarray(sizes, float) ** (1 / temperature)
    expected = expected / expected.sum() * len(drawn)  # 4:2:1 of 1313 batches
    chi2 = sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected))
    assert chi2 < 13.8, (counts, expected)  # p = 0.001 for 2 degrees of freedom
    proportional = batches("temperature", sizes=sizes, temperature=1.0)
    assert Counter(t for t, _ in proportional)[2] < counts[2], "T > 1 samples the small task more often"


def test_round_robin_alternates_and_cycles_small_tasks():
    drawn = batches("round_robin", sizes=(40, 12, 4))
    assert [t for t, _ in drawn] == [i % 3 for i in range(14)]
    small = [batch for task, batch in drawn if task == 2]
    assert len(small) == 4 and all(sorted(batch) == [52, 53, 54, 55] for batch in small)


def test_batch_order_depends_on_seed_and_epoch_only():
    assert batches("temperature", seed=1, epoch=2) == batches("temperature", seed=1, epoch=2)
    assert batches("temperature", seed=1, epoch=2) != batches("temperature", seed=1, epoch=3)
    assert batches("proportional", seed=1) != batches("proportional", seed=2)


def task_model(folder, tasks, method="lora", cfg=None, share=False):
    from types import SimpleNamespace

    recipe = SimpleNamespace(method_name=method, method=cfg or LoraConfig(r=4, target_modules=["query", "value"]),
                             share_across_layers=share)
    base = auto_class(TASK).from_pretrained(folder)
    return prepare_model(base, recipe.method_name, recipe.method, recipe.share_across_layers, tasks)


def two_tasks():
    return [TaskInfo("a", 0, ["x", "y"], 2, ["accuracy"]),
            TaskInfo("b", 1, ["p", "q", "r", "s"], 4, ["accuracy"])]


def test_heads_are_separate_and_method_tensors_shared(tiny_bert):
    model = task_model(tiny_bert, two_tasks())
    ids = torch.randint(8, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    lora_a = model.bert.encoder.layer[0].attention.self.query.lora_A
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("query.lora_A")) == 2  # one per layer

    out_a = model(input_ids=ids, task_ids=torch.zeros(3, dtype=torch.long), labels=torch.tensor([0, 1, 1]))
    assert out_a.logits.shape == (3, 2)
    out_a.loss.backward()
    grad_a = lora_a.grad.clone()
    heads = model.classifier.heads
    assert heads["a"].weight.grad is not None and heads["b"].weight.grad is None
    with torch.no_grad():  # LoRA's B starts at 0, so A's gradient is 0 until B moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    model.zero_grad()
    out_a = model(input_ids=ids, task_ids=torch.zeros(3, dtype=torch.long), labels=torch.tensor([0, 1, 1]))
    out_a.loss.backward()
    grad_a = lora_a.grad.clone()
    out_b = model(input_ids=ids, task_ids=torch.ones(3, dtype=torch.long), labels=torch.tensor([3, 0, 2]))
    assert out_b.logits.shape == (3, 4)
    out_b.loss.backward()
    assert grad_a.abs().sum() > 0 and not torch.equal(lora_a.grad, grad_a), "both tasks reach the shared LoRA"
    assert heads["b"].weight.grad is not None
    with pytest.raises(ValueError, match="mixes tasks"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 0]))


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_base(folder):
    return auto_class(TASK).from_pretrained(folder)


def test_share_across_layers_ties_one_tensor_per_target(tiny_bert, tmp_path):
    cfg = LoraConfig(r=4, target_modules=["query", "value"])
    plain = prepare_model(load_base(tiny_bert), "lora", cfg)
    shared = prepare_model(load_base(tiny_bert), "lora", cfg, share_across_layers=True)
    layers = shared.bert.encoder.layer
    for target in ("query", "value"):
        first, second = (getattr(layer.attention.self, target) for layer in layers)
        assert first.lora_A is second.lora_A and first.lora_B is second.lora_B
        assert first.lora_A.data_ptr() == second.lora_A.data_ptr()
    lora_per_layer = 2 * (4 * 32 + 32 * 4)  # query + value, A and B, in each of the 2 layers
    assert count_trainable(plain) - count_trainable(shared) == lora_per_layer

    with torch.no_grad():
        layers[0].attention.self.query.lora_B.add_(0.1)  # moves every layer's update at once
    save_trained(shared, tmp_path, {"method": "lora", "format_version": FORMAT_VERSION})
    reloaded = prepare_model(load_base(tiny_bert), "lora", cfg, share_across_layers=True)
    load_tensors_into(reloaded, tmp_path / TENSORS)
    assert torch.equal(reloaded.bert.encoder.layer[1].attention.self.query.lora_B,
                       layers[1].attention.self.query.lora_B)
    ids = torch.randint(8, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, shared.eval()(input_ids=ids).logits)
    merged = METHODS["lora"].merge(reloaded, cfg)
    torch.testing.assert_close(merged(input_ids=ids).logits, shared(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_share_across_layers_with_ia3_and_adapters(tiny_bert):
    for name in ("ia3", "adapter"):
        cfg = METHODS[name].config_cls()
        plain = prepare_model(load_base(tiny_bert), name, cfg)
        shared = prepare_model(load_base(tiny_bert), name, cfg, share_across_layers=True)
        assert count_trainable(shared) < count_trainable(plain), name


@pytest.mark.parametrize("method,options,message", [
    ("bitfit", {}, "trains only the base model's own weights"),
    ("prompt_tuning", {}, "not repeated in numbered layers"),
    ("adalora", {}, "AdaLoRA"),
    ("lora", {"use_dora": True}, "DoRA"),
    ("lora", {"rank_pattern": {"layer\\.0\\..*": 2}}, "different shapes across layers"),
])
def test_share_across_layers_refusals(tiny_bert, method, options, message):
    cfg = METHODS[method].config_cls(**options)
    with pytest.raises(UserError, match=message):
        prepare_model(load_base(tiny_bert), method, cfg, share_across_layers=True)


def refused(result, want):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert want in lines[0], lines[0]


@pytest.mark.parametrize("edit,want", [
    (lambda r: r["data"].update(sampling="random"), "must be one of proportional, temperature, round_robin"),
    (lambda r: r["data"].update(tasks={}), "data.tasks: is empty"),
    (lambda r: r["data"].update(train=str(REVIEWS / "train.jsonl")), "data.train and data.tasks exclude each other"),
    (lambda r: r["data"]["tasks"]["pairs"].pop("train"), "data.tasks.pairs.train: is required"),
    (lambda r: r["data"]["tasks"]["pairs"].update(label="nope"), "data.tasks.pairs.train: column 'nope' not found"),
    (lambda r: r["data"]["tasks"]["size"].update(metrics=["accuracy"]), "data.tasks.size.metrics: 'accuracy' does not apply"),
    (lambda r: r["train"].update(metric_for_best_model="accuracy", eval_strategy="epoch"),
     "'accuracy' is not computed during training; choose one of"),
    (lambda r: r["method"].update(share_across_layers="yes please"), "method.share_across_layers: expected true"),
    (lambda r: r["model"].update(num_labels=3), "model.num_labels: with data.tasks each task has its own"),
])
def test_bad_multitask_recipes(tiny_bert, data, tmp_path, edit, want):
    out = tmp_path / "out"
    path = write_recipe(tmp_path, tiny_bert, data, out)
    recipe = yaml.safe_load(path.read_text())
    edit(recipe)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    refused(run_cli("train", str(path)), want)
    assert not out.exists()
