"""Evaluation: metrics against scikit-learn, entity spans, predictions, reports, best checkpoints, bad settings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.training.metrics import classification_metrics, regression_metrics
from peftcli.runs.eval_report import per_class_report
from peftcli.training.spans import entities, entity_report, entity_scores
from test_cli import write_recipe
from tiny import REVIEWS, build_tiny

runner = CliRunner()
GOLD = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0])
PRED = np.array([0, 2, 2, 1, 1, 0, 1, 2, 1, 0, 2, 0])
REVIEW_DATA = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
               "limit": {"train": 48, "eval": 16}}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_classification_metrics_match_sklearn():
    from sklearn import metrics as skm

    got = classification_metrics(PRED, GOLD, ["accuracy", "f1", "f1_macro", "f1_micro", "mcc"], num_labels=3)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(GOLD, PRED)) == pytest.approx(8 / 12)
    assert got["f1"] == pytest.approx(skm.f1_score(GOLD, PRED, average="macro"))  # macro when not binary
    assert got["f1_micro"] == pytest.approx(skm.f1_score(GOLD, PRED, average="micro"))
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(GOLD, PRED))
    binary = classification_metrics(PRED % 2, GOLD % 2, ["f1"], num_labels=2)
    assert binary["f1"] == pytest.approx(skm.f1_score(GOLD % 2, PRED % 2))


def test_regression_metrics_match_scipy():
    from scipy import stats

    x, y = np.array([0.1, 0.4, 0.35, 0.8, 0.9]), np.array([0.0, 0.5, 0.3, 0.7, 1.0])
    got = regression_metrics(x, y, ["pearson", "spearman", "mse"])
    assert got["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert got["spearman"] == pytest.approx(1.0)  # same order
    assert got["mse"] == pytest.approx(np.mean((x - y) ** 2))


def test_per_class_report_matches_sklearn():
    from sklearn.metrics import classification_report, confusion_matrix

    report = per_class_report(PRED, GOLD, ["neg", "neu", "pos"])
    expected = classification_report(GOLD, PRED, target_names=["neg", "neu", "pos"], output_dict=True)
    for name in ("neg", "neu", "pos"):
        for key, sk_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert report["classes"][name][key] == pytest.approx(expected[name][sk_key])
        assert report["classes"][name]["support"] == expected[name]["support"]
    assert report["confusion_matrix"] == confusion_matrix(GOLD, PRED).tolist()


def test_entity_spans_bio_and_iobes():
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 5)}
    assert entities(["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "S-ORG"]) == {("PER", 0, 0), ("LOC", 1, 3),
                                                                             ("ORG", 5, 5)}
    assert entities(["I-PER", "I-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 2, 2)}  # IOB1-style starts
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "B-PER"]]
    # 2 of 4 predicted spans are right (LOC, ORG); 2 of 3 gold spans are found: P 1/2, R 2/3, F1 4/7.
    scores = entity_scores(gold, pred)
    assert scores["entity_precision"] == pytest.approx(0.5)
    assert scores["entity_recall"] == pytest.approx(2 / 3)
    assert scores["entity_f1"] == pytest.approx(4 / 7)
    assert entity_report(gold, pred)["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_predictions_report_and_base(tiny_bert, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "lora"}, REVIEW_DATA,
                          out, max_steps=2)
    assert invoke("train", recipe).exit_code == 0
    assert (out / "per_class.json").is_file() and (out / "confusion_matrix.png").is_file()
    result = invoke("eval", out, "--predictions", tmp_path / "p.jsonl", "--report", tmp_path / "rep", "--json")
    assert result.exit_code == 0, result.output
    metrics = last_json(result)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    truth = [json.loads(line) for line in (REVIEWS / "validation.jsonl").read_text().splitlines()[:16]]
    assert [r["text"] for r in rows] == [t["text"] for t in truth]
    assert [r["label"] for r in rows] == [t["label"] for t in truth]  # names, not ids
    assert {r["prediction"] for r in rows} <= {"negative", "positive"}
    assert metrics["accuracy"] == pytest.approx(np.mean([r["label"] == r["prediction"] for r in rows]))
    report = json.loads((tmp_path / "rep" / "per_class.json").read_text())
    assert sum(report["classes"][n]["support"] for n in report["labels"]) == 16
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text()) == metrics

    result = invoke("eval", recipe, "--base", "--json")
    assert result.exit_code == 0, result.output
    assert set(last_json(result)) == {"accuracy", "f1"}
    assert invoke("eval", recipe, "--base", "--json").stdout == result.stdout  # the random head is seeded


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "prompt_tuning"}])
def test_load_best_model_at_end_restores_best_checkpoint(tiny_bert, tmp_path, method):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", method, REVIEW_DATA, out,
                          max_steps=5, learning_rate=0.3, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                          save_steps=1, load_best_model_at_end=True, metric_for_best_model="loss")
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["eval_loss"] for row in logged if "eval_loss" in row}
    assert sorted(losses) == [1, 2, 3, 4, 5]
    best = min(losses, key=losses.get)
    state = json.loads((out / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best}"
    final, chosen = load_file(out / "adapter.safetensors"), load_file(out / f"checkpoint-{best}/adapter.safetensors")
    assert final.keys() == chosen.keys()
    for name in final:
        torch.testing.assert_close(final[name], chosen[name], rtol=0, atol=0)
    # lr 0.3 makes the eval loss bounce (seeded: lora is best at step 4, prompt tuning at 2): the last step is
    # not the best, so the final weights must differ from the last checkpoint's.
    last = load_file(out / "checkpoint-5/adapter.safetensors")
    assert best < 5 and any(not torch.equal(final[n], last[n]) for n in final)
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(
        last_json(invoke("eval", out, "--checkpoint", "best", "--json"))["accuracy"])


@pytest.mark.parametrize("train, message", [
    ({"eval_strategy": "steps", "load_best_model_at_end": True}, "set train.save_strategy: steps"),
    ({"eval_strategy": "steps", "metric_for_best_model": "rouge_l"}, "not computed during training"),
    ({"save_strategy": "steps"}, None),
])
def test_best_model_settings_are_checked_before_loading(tiny_bert, tmp_path, train, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "lora"}, REVIEW_DATA,
                          tmp_path / "run", **train)
    result = invoke("validate", recipe)
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_missing_evaluate_metric_is_a_clear_error(tiny_bert, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "lora"}, REVIEW_DATA,
                          tmp_path / "run")
    result = invoke("validate", recipe, "--set", "eval.metrics=[evaluate:no_such_metric_here]")
    assert result.exit_code == 2
    assert "'evaluate:no_such_metric_here' is not available locally" in result.stderr


def test_token_classification_entity_f1_logged_during_training(tmp_path):
    words = [("ann", "B-PER"), ("smith", "I-PER"), ("visited", "O"), ("paris", "B-LOC"), ("and", "O"),
             ("rome", "B-LOC")]
    rows = [{"tokens": [w for w, _ in words[i:] + words[:i]], "tags": [t for _, t in words[i:] + words[:i]]}
            for i in range(6)]
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    model = build_tiny("bert-token", tmp_path / "tiny-token", num_labels=4)
    out = tmp_path / "run"
    data = {"train": str(tmp_path / "ner.jsonl"), "eval_fraction": 0.25, "max_length": 16}
    recipe = write_recipe(tmp_path / "r.yaml", model, "token-classification", {"name": "lora"}, data, out,
                          max_steps=2, eval_strategy="steps", eval_steps=1)
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text() + "eval:\n  metrics: [entity_f1, accuracy]\n")
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "eval_entity_f1" in row] == [1, 2]
    assert set(json.loads((out / "metrics.json").read_text())) == {"entity_f1", "accuracy"}
    assert "PER" in json.loads((out / "per_class.json").read_text())["entities"]
    result = invoke("eval", out, "--predictions", tmp_path / "p.jsonl")
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert len(first["predicted"]) == len(first["tokens"]) and set(first["predicted"]) <= {t for _, t in words}


def test_early_stopping_stops_when_the_eval_loss_stops_improving(tiny_bert, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "lora", "r": 4},
                          REVIEW_DATA, out, max_steps=5, learning_rate=0.3, eval_strategy="steps", eval_steps=1)
    result = invoke("train", recipe, "--set", "eval.early_stopping_patience=1")
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["eval_loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "eval_loss" in line]
    # Seeded as in the best-checkpoint test: step 2 is worse than step 1, so patience 1 stops there.
    assert len(losses) == 2 and losses[1] > losses[0]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
