"""Commands that do not train stay light (issue #24): no HF peft, bitsandbytes or other optional backend imported,
and no warning on stderr. Timings are scripts/bench_startup.py's job; this guards the imports behind them."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

from peftcli.methods.registry import MethodCallback
from peftcli.config.schema import init_field_names

REPO = Path(__file__).resolve().parents[1]
# Runs the real CLI in a fresh interpreter, then reports which heavy top-level packages it imported.
PROBE = """
import json, sys
from peftcli.cli import main
args, heavy = sys.argv[1:-1], sys.argv[-1].split(",")
sys.argv = ["peft", *args]
code = 0
try:
    main()
except SystemExit as stop:
    code = stop.code or 0
print(json.dumps({"code": code, "imported": sorted(m for m in heavy if m in sys.modules)}))
"""
OPTIONAL = ("peft", "bitsandbytes", "matplotlib", "datasets", "evaluate")


@pytest.mark.parametrize("args, absent", [
    (["--help"], OPTIONAL + ("torch", "transformers")),
    (["methods"], OPTIONAL),
    # the quickstart's recipe is LoRA: the skeleton needs torch and transformers, but no quantisation backend
    (["validate", "recipes/quickstart.yaml"], OPTIONAL),
], ids=["help", "methods", "validate"])
def test_command_imports_no_optional_backend_and_prints_no_warning(args, absent):
    done = subprocess.run([sys.executable, "-c", PROBE, *args, ",".join(absent)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "imported": []}, done.stderr[-2000:]
    assert "warn" not in done.stderr.lower(), done.stderr[-2000:]


def test_method_callbacks_ignore_every_trainer_event_they_do_not_define():
    # The Trainer calls events by name; each one TrainerCallback defines must be a no-op on MethodCallback.
    events = [name for name in vars(TrainerCallback) if name.startswith("on_")]
    assert len(events) > 10
    for event in events:
        assert getattr(MethodCallback(), event)(None, None, None, model=None) is None
    with pytest.raises(AttributeError):
        MethodCallback().not_an_event


def test_training_arguments_keys_read_from_source_match_the_dataclass():
    from transformers import TrainingArguments

    expected = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert init_field_names("transformers.training_args", "TrainingArguments") == expected


def test_init_field_names_parses_plain_dataclasses_and_imports_the_rest(tmp_path, monkeypatch):
    (tmp_path / "startup_probe_fields.py").write_text(
        "import dataclasses\nfrom dataclasses import dataclass, field\nfrom typing import ClassVar\n\n"
        "@dataclass\nclass Plain:\n    a: int = 0\n    b: int = field(default=1, init=False)\n"
        "    c: ClassVar[int] = 2\n\n"
        "@dataclass\nclass Child(Plain):\n    d: int = 3\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "startup_probe_fields", raising=False)
    assert init_field_names("startup_probe_fields", "Plain") == {"a"}
    assert "startup_probe_fields" not in sys.modules  # read, not imported
    assert init_field_names("startup_probe_fields", "Child") == {"a", "d"}  # inherited fields: imported
    monkeypatch.delitem(sys.modules, "startup_probe_fields")
