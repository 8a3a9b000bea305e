"""Every shipped recipe validates (data read, labels inferred, method injected on the meta device).

AdapterFusion recipes fuse earlier runs: without those runs they must fail cleanly, naming method.sources;
the slow tier trains the source recipes briefly and then validates the fusion recipe for real."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftcli.cli import app

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


@pytest.fixture(scope="session", autouse=True)
def digits_tree():
    """recipes/prompt/digits_vpt.yaml reads build/digits, which `python scripts/make_digits.py` writes."""
    if not (REPO / "build" / "digits" / "vit").is_dir():
        import subprocess
        import sys

        subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), "--out",
                        str(REPO / "build" / "digits")], check=True, capture_output=True)


def sources_of(recipe: Path) -> list[str]:
    return (yaml.safe_load(recipe.read_text(encoding="utf-8")).get("method") or {}).get("sources") or []


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(REPO / "recipes")) for r in RECIPES])
def test_recipe_validates(recipe, shared_data, monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    if sources_of(recipe) and not all((REPO / s).is_dir() for s in sources_of(recipe)):
        assert result.exit_code == 2 and "method.sources" in result.stderr, result.output
        return
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok:")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in RECIPES if sources_of(r)], ids=lambda r: r.name)
def test_fusion_recipe_validates_after_its_sources(recipe, shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sources' relative output_dirs land in tmp_path/runs/
    for source in sources_of(recipe):
        source_recipe = recipe.parent / f"{Path(source).name}.yaml"
        result = CliRunner().invoke(app, ["train", str(source_recipe), "--set", "train.max_steps=2",
                                          "--set", f"data.train={shared_data}/glue/SST-2/train.tsv",
                                          "--set", f"data.eval={shared_data}/glue/SST-2/dev.tsv"])
        assert result.exit_code == 0, result.output
    data = ["--set", f"data.train={shared_data}/glue/SST-2/train.tsv",
            "--set", f"data.eval={shared_data}/glue/SST-2/dev.tsv", "--set", "data.limit={train: 64, eval: 64}"]
    result = CliRunner().invoke(app, ["validate", str(recipe), *data])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["train", str(recipe), *data, "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output


def test_every_recipe_says_what_and_how():
    for recipe in RECIPES:
        head = recipe.read_text(encoding="utf-8").splitlines()[:6]
        assert head[0].startswith("#"), f"{recipe} must open with a comment saying what it trains"
        assert any("peft " in line for line in head if line.startswith("#")), f"{recipe}: give the command"
