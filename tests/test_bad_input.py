"""Bad input through the real CLI: exit 2, one line naming the place and the fix, no traceback, nothing written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runhelp import run_cli

CASES = Path(__file__).parent / "bad_inputs"
NO_EXPECT_LINE = {"empty.yaml": "the recipe is empty"}  # files that cannot carry a `# expect:` comment
PWNED = Path("/tmp/peftcli-bad-input-pwned")


def expected(path: Path) -> str:
    if path.name in NO_EXPECT_LINE:
        return NO_EXPECT_LINE[path.name]
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name} must open with '# expect: <text of the error>'"
    return first[len("# expect: "):]


def snapshot(folder: Path) -> list[tuple[str, float]]:
    if not folder.is_dir():
        return []
    return sorted((str(p), p.stat().st_mtime) for p in folder.iterdir())


@pytest.fixture
def case_env(tiny_bert, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_BERT", str(tiny_bert))
    monkeypatch.setenv("TINY_LLAMA", str(tiny_llama))
    monkeypatch.setenv("PEFT_TEST_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("HF_TOKEN", "hf_canary_do_not_copy")
    return tmp_path / "out"


def assert_refused(result, want: str, out: Path):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert want in lines[0], f"{want!r} not in {lines[0]!r}"
    assert "Traceback" not in result.output
    assert not out.exists(), "a refused run must not create its output directory"


@pytest.mark.parametrize("path", sorted(CASES.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_recipe_is_refused_in_one_line(path, case_env, tiny_bert):
    watched = [tiny_bert, CASES / "data", Path.home()]
    before = [snapshot(p) for p in watched]
    result = run_cli("train", str(path))
    assert_refused(result, expected(path), case_env)
    assert [snapshot(p) for p in watched] == before, "an input folder was changed"
    assert not PWNED.exists(), "a YAML tag executed code"


def test_oversize_recipe(case_env, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# filler\n" * 200_000)
    assert_refused(run_cli("train", str(path)), "too large for a recipe", case_env)


def test_huge_single_data_line(case_env, tmp_path):
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as handle:
        handle.write('{"text": "' + "a" * (17 << 20) + '", "label": "x"}\n')
    recipe = (CASES / "data_empty.yaml").read_text().replace("${recipe_dir}/data/empty.jsonl", str(data))
    (tmp_path / "r.yaml").write_text(recipe)
    assert_refused(run_cli("train", str(tmp_path / "r.yaml")), "huge.jsonl:1: a single line", case_env)


def test_merge_export_onto_its_own_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: {}\n")
    result = run_cli("merge-export", str(run), "--out", str(run))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


VALID = yaml.safe_load((CASES / "unknown_key.yaml").read_text().replace("  learning_rat: 1e-3\n", "")
                       .replace("${recipe_dir}/../..", str(CASES.parents[1])))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                    st.lists(st.text(max_size=4), max_size=3))
paths = st.sampled_from([(s, k) for s, section in VALID.items() for k in section] + [(s, None) for s in VALID])


# CI replays the same 40 mutations (derandomized); PEFT_FUZZ_EXAMPLES=N explores N fresh random ones.
FUZZ = int(os.environ.get("PEFT_FUZZ_EXAMPLES", "0"))


@settings(max_examples=FUZZ or 40, derandomize=not FUZZ, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(paths, scalars, st.sampled_from(["set", "delete", "add"])), min_size=1, max_size=3))
def test_mutated_recipes_never_crash(edits, tmp_path_factory, tiny_bert, tiny_llama):
    """Any mutation of a valid recipe either validates or is refused with exit 2: never a traceback."""
    folder = tmp_path_factory.mktemp("mutant")
    recipe = yaml.safe_load(yaml.safe_dump(VALID))
    for (section, key), value, action in edits:
        target = recipe.setdefault(section, {}) if isinstance(recipe.get(section), dict) else recipe
        if action == "delete":
            (target if key else recipe).pop(key or section, None)
        elif action == "add":
            target[f"x_{key or section}"] = value
        else:
            target[key or section] = value
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {"TINY_BERT": str(tiny_bert), "TINY_LLAMA": str(tiny_llama), "PEFT_TEST_OUT": str(folder / "out")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = run_cli("validate", str(path))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert result.exit_code in (0, 2), result.output


def test_the_unmutated_recipe_is_valid(tiny_bert, tmp_path, monkeypatch):
    """The property test starts from a valid recipe (else it would only ever see refusals)."""
    monkeypatch.setenv("TINY_BERT", str(tiny_bert))
    monkeypatch.setenv("PEFT_TEST_OUT", str(tmp_path / "out"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(VALID))
    result = run_cli("validate", str(tmp_path / "r.yaml"))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output


def test_tokenizer_without_pad_or_eos_token(case_env, tiny_bert, tmp_path):
    """Batching needs a pad token (or an EOS to pad with): a tokenizer with neither is refused before training."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_bert, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(folder)}, "method": {"name": "lora"}, "train": {"output_dir": str(case_env)},
        "data": {"train": str(CASES / "data" / "three_labels.jsonl")}}))
    assert_refused(run_cli("train", str(recipe)), "has neither a pad nor an eos token", case_env)


def test_merging_a_prompt_method_is_refused(tiny_bert, tmp_path):
    """Prompt tuning has nothing to fold into the weights: merge-export says so and names the alternative."""
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_bert)}, "method": {"name": "prompt_tuning"},
        "data": {"train": str(CASES / "data" / "three_labels.jsonl")},
        "train": {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 2}}))
    assert run_cli("train", str(recipe)).exit_code == 0
    merged = tmp_path / "merged"
    result = run_cli("merge-export", str(out), "--out", str(merged))
    assert_refused(result, "cannot be merged", merged)


@pytest.mark.parametrize("override,expect", [
    ("train.learnin_rate=3e-4", "--set train.learnin_rate=3e-4: train.learnin_rate: unknown key (did you mean "
                                "'learning_rate'?)"),
    ("method.rr=3", "--set method.rr=3: method.rr: unknown key (did you mean 'r'?)"),
    ("method.r=-3", "--set method.r=-3: method.r: must be > 0"),
])
def test_a_bad_override_is_reported_at_its_set_argument(override, expect, tiny_bert, tmp_path):
    """Not at a line of the recipe file, which holds no such key."""
    from runhelp import write_recipe

    result = run_cli("validate", str(write_recipe(tmp_path, tiny_bert, tmp_path / "out")), "--set", override)
    assert result.exit_code == 2
    assert expect in result.output and "recipe.yaml:" not in result.output


def test_an_unknown_train_key_links_the_training_arguments_reference(tiny_bert, tmp_path):
    from runhelp import write_recipe

    result = run_cli("validate", str(write_recipe(tmp_path, tiny_bert, tmp_path / "out")),
                     "--set", "train.eval_step=5")
    assert result.exit_code == 2
    assert "also close: " in result.output and "eval_steps" in result.output
    assert "/main_classes/trainer#transformers.TrainingArguments" in result.output
