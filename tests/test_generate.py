"""Generation: greedy determinism, batched left padding = one by one, generation metrics, `peft generate`."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.models.generation import GenerationSettings, generate, render_prompt
from peftcli.training.text_metrics import generation_metrics
from test_cli import write_recipe

runner = CliRunner()
WORDS = ("great", "bad", "film", "food", "slow", "fresh", "loud", "warm")
PROMPTS = ["say the word great", "the food was slow and the service was loud , never again", "warm",
           "write a response that describes the film in one word please"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def test_greedy_is_deterministic_and_batching_matches_one_by_one(llama):
    model, tokenizer = llama
    prompts = [render_prompt(tokenizer, p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=12)
    batched = generate(model, tokenizer, prompts, settings, batch_size=4)
    assert generate(model, tokenizer, prompts, settings, batch_size=4) == batched
    assert [generate(model, tokenizer, [p], settings, batch_size=1)[0] for p in prompts] == batched
    assert all(text for text in batched)  # a random model still emits tokens: the comparison is not vacuous


def test_sampling_follows_the_seed(llama):
    model, tokenizer = llama
    prompts = [render_prompt(tokenizer, p) for p in PROMPTS[:2]]
    sample = lambda seed: generate(model, tokenizer, prompts,  # noqa: E731
                                   GenerationSettings(max_new_tokens=12, do_sample=True, seed=seed))
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_generation_metrics_on_known_pairs():
    same = generation_metrics(["the cat sat on the mat today"], ["the  cat sat on the mat today "],
                              ["exact_match", "rouge_l", "bleu", "chrf"])
    assert same == pytest.approx({"exact_match": 1.0, "rouge_l": 1.0, "bleu": 100.0, "chrf": 100.0})
    apart = generation_metrics(["dogs run"], ["the cat sat"], ["exact_match", "rouge_l", "bleu"])
    assert apart == pytest.approx({"exact_match": 0.0, "rouge_l": 0.0, "bleu": 0.0})
    # ROUGE-L F: LCS "the cat sat" (3) over 3 predicted and 6 reference tokens: P 1, R 1/2, F 2/3.
    assert generation_metrics(["the cat sat"], ["the cat sat on the mat"], ["rouge_l"])["rouge_l"] == \
        pytest.approx(2 / 3)


def test_eval_generate_and_peft_generate(tiny_llama, tmp_path):
    rows = [{"instruction": f"say the word {w}", "input": "", "output": f"{w} {w} {w}"} for w in WORDS]
    (tmp_path / "sft.json").write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "run"
    data = {"train": str(tmp_path / "sft.json"), "eval_fraction": 0.5, "max_length": 64}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, "causal-lm", {"name": "lora"}, data, out, max_steps=2,
                          per_device_train_batch_size=2)
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["eval", str(out), "--generate", "--max-new-tokens", "6", "--json",
                                 "--predictions", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf"}
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(p["reference"].split()[0] in WORDS for p in predictions)
    assert all(p["prompt"].startswith("<|user|> say the word") for p in predictions)  # chat template applied
    again = runner.invoke(app, ["eval", str(out), "--generate", "--max-new-tokens", "6", "--json"])
    assert json.loads(again.stdout.strip().splitlines()[-1]) == metrics  # greedy: the same scores

    result = runner.invoke(app, ["generate", str(out), "--prompt", "say the word warm", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    assert 1 <= len(AutoTokenizer.from_pretrained(tiny_llama)(result.stdout.strip())["input_ids"]) <= 5
    result = runner.invoke(app, ["generate", str(recipe), "--base", "--prompt", "hi", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


def test_generation_needs_prompt_response_data(tiny_llama, tmp_path):
    (tmp_path / "lm.txt").write_text("the food was great\nthe film was slow\n" * 20, encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, "causal-lm", {"name": "lora"},
                          {"train": str(tmp_path / "lm.txt"), "eval_fraction": 0.2, "max_length": 16},
                          tmp_path / "run", max_steps=1)
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--generate"])
    assert result.exit_code == 2 and "plain-text data has no prompt/response pairs" in result.stderr
