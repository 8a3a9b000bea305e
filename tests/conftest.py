"""Shared fixtures: tiny offline models, the shared data folder, a CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny import build_tiny

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PEFT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from tiny import build_tiny_vit

    return build_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def tiny_models(tiny_bert, tiny_llama, tiny_vit) -> dict[str, Path]:
    """Base model folder per task, for tests that run over the registry."""
    return {"sequence-classification": tiny_bert, "causal-lm": tiny_llama, "image-classification": tiny_vit}


@pytest.fixture
def shared_data() -> Path:
    """The real datasets. CI always has them (a missing folder fails there); elsewhere the test is skipped."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data folder {SHARED_DATA} missing in CI")
        pytest.skip(f"shared data folder {SHARED_DATA} not present (set PEFT_DATA)")
    return SHARED_DATA
