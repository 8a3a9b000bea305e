"""The CLI end to end on tiny models: train -> eval -> merge-export -> reload gives the same predictions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from peftcli.cli import app
from tiny import REVIEWS

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def write_recipe(path: Path, model_dir: Path, task: str, method: dict, data: dict, out: Path, **train) -> Path:
    recipe = {"model": {"name_or_path": str(model_dir), "task": task}, "data": data, "method": method,
              "train": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 8,
                        "learning_rate": 1e-2, "logging_steps": 1, "seed": 7, **train}}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_methods_json_lists_the_spine_methods():
    result = invoke("methods", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])}
    assert {"lora", "bitfit", "freeze", "full"} <= set(rows)
    assert rows["lora"]["mergeable"] and "sequence-classification" in rows["lora"]["tasks"]
    assert rows["lora"]["options"]["r"]["default"] == 8


def test_classification_train_eval_merge_roundtrip(tiny_bert, tmp_path):
    out = tmp_path / "run"
    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
            "limit": {"train": 64, "eval": 24}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification",
                          {"name": "lora", "r": 4, "target_modules": "all-linear"}, data, out)
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert f"run saved to {out}" in result.stdout
    for name in ("recipe.yaml", "adapter.safetensors", "method.json", "metrics.json", "log.jsonl", "loss.png",
                 "README.md", "trainer_state.json"):
        assert (out / name).is_file(), name

    result = invoke("eval", out, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"accuracy", "f1"} and 0 <= metrics["accuracy"] <= 1
    assert metrics == pytest.approx(json.loads((out / "metrics.json").read_text()))

    merged = tmp_path / "merged"
    result = invoke("merge-export", out, "--out", merged)
    assert result.exit_code == 0, result.output
    assert_same_predictions(out, merged, "sequence-classification")


def test_train_ends_with_metrics_plots_and_stage_times(tiny_bert, tmp_path):
    """The last lines of `peft train` show metrics.json's numbers and the plots; run_info.json splits the wall time
    of the command into stages (issue #24: train_seconds alone left data preparation out)."""
    out = tmp_path / "run"
    data = {"train": str(REVIEWS / "train.jsonl"), "eval": str(REVIEWS / "validation.jsonl"), "max_length": 32,
            "limit": {"train": 32, "eval": 16}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "lora", "r": 4},
                          data, out, max_steps=2)
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "f1"}
    for name, value in metrics.items():
        assert [name, f"{value:.4f}"] in [line.split() for line in lines], result.stdout
    assert f"plot: {out / 'loss.png'}" in lines and f"plot: {out / 'confusion_matrix.png'}" in lines
    assert lines[-1] == f"run saved to {out}"

    info = json.loads((out / "run_info.json").read_text())
    stages = info["seconds"]
    assert list(stages) == ["prepare_data", "load_model", "train", "save_and_evaluate", "total"]
    assert all(value >= 0 for value in stages.values())
    assert sum(value for name, value in stages.items() if name != "total") <= stages["total"] + 1e-9
    assert stages["train"] == pytest.approx(info["train_seconds"], abs=0.1)  # the old field keeps its meaning
    assert f"time: {stages['total']:.1f} s in all" in result.stdout


def test_causal_lm_alpaca_train_eval_merge(tiny_llama, tmp_path):
    rows = [{"instruction": f"say the word {w}", "input": "", "output": f"{w} {w} {w}"}
            for w in ("great", "bad", "film", "food", "slow", "fresh", "loud", "warm")]
    (tmp_path / "sft.json").write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "run"
    data = {"train": str(tmp_path / "sft.json"), "eval_fraction": 0.25, "max_length": 64}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, "causal-lm", {"name": "lora"}, data, out,
                          per_device_train_batch_size=4)  # 6 train rows: a batch of 8 is refused as bad input
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"loss", "perplexity"} and metrics["perplexity"] > 1
    result = invoke("merge-export", out, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert_same_predictions(out, tmp_path / "merged", "causal-lm")


def assert_same_predictions(run_dir: Path, merged_dir: Path, task: str):
    """The merged folder loads with plain transformers and reproduces the run's outputs (fp32, 1e-4)."""
    from peftcli.models.loading import auto_class
    from peftcli.runs.folder import load_trained

    _, _, model, tokenizer = load_trained(run_dir)
    plain = auto_class(task).from_pretrained(merged_dir).eval()
    assert not any(type(m).__module__.startswith("peftcli") for m in plain.modules())
    batch = tokenizer(["the food was great", "slow and loud service, never again"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_bad_recipe_is_one_line_exit_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  name_or_path: x\ndata:\n  train: d.jsonl\nmethod:\n  name: lora\n  rank: 8\n")
    result = invoke("train", recipe)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"{recipe}:7" in result.stderr and "did you mean 'r'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_merge_export_refuses_its_own_input(tiny_bert, tmp_path):
    out = tmp_path / "run"
    data = {"train": str(REVIEWS / "train.jsonl"), "max_length": 16, "limit": {"train": 16}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, "sequence-classification", {"name": "bitfit"}, data, out,
                          max_steps=1)
    assert invoke("train", recipe).exit_code == 0
    result = invoke("merge-export", out, "--out", out)
    assert result.exit_code == 2 and "run directory itself" in result.stderr


def test_image_classification_train_then_eval(tmp_path):
    """VPT on scikit-learn digits: the image task through train, eval (with predictions) and a refused merge."""
    from tiny import build_tiny_vit, write_digits

    write_digits(tmp_path / "digits")
    build_tiny_vit(tmp_path / "vit")
    out = tmp_path / "run"
    data = {"train": str(tmp_path / "digits" / "train"), "eval": str(tmp_path / "digits" / "test")}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "vit", "image-classification", {"name": "vpt"}, data, out,
                          max_steps=2)
    assert invoke("train", recipe).exit_code == 0
    result = invoke("eval", out, "--json", "--predictions", tmp_path / "pred.jsonl")
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout.strip().splitlines()[-1])["accuracy"] <= 1
    first = json.loads((tmp_path / "pred.jsonl").read_text().splitlines()[0])
    assert first["image"].endswith(".png") and first["label"] in [str(d) for d in range(10)]
    result = invoke("merge-export", out, "--out", tmp_path / "merged")
    assert result.exit_code == 2 and "peft export" in result.stderr


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_prompt_method_runs_generate_and_score(method, tiny_llama, tmp_path):
    """Virtual tokens / prefixes survive the whole path: train, then `peft generate` and `peft eval --generate`."""
    rows = [{"instruction": f"say the word {w}", "input": "", "output": f"{w} {w}"}
            for w in ("great", "bad", "film", "food", "slow", "fresh", "loud", "warm")]
    (tmp_path / "sft.json").write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "run"
    data = {"train": str(tmp_path / "sft.json"), "eval_fraction": 0.25, "max_length": 48}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, "causal-lm", {"name": method}, data, out,
                          max_steps=2, per_device_train_batch_size=2)
    assert invoke("train", recipe).exit_code == 0
    result = invoke("generate", out, "--prompt", "say the word food", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    result = invoke("eval", out, "--generate", "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"loss", "exact_match"} <= set(metrics)
