"""The README as a newcomer reads it: its set-up command in a fresh clone and venv, then every command of its "Use"
block in order, each exiting 0 and printing what its `# prints "..."` / `# last line: {...}` comment says.

Slow tier (`python -m pytest -m slow tests/test_readme_walkthrough.py`): it installs the project from scratch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```\n(.*?)^```", re.S | re.M)


def section_block(readme: str, heading: str) -> str:
    """The first fenced block under a `## heading`."""
    body = readme.split(f"\n## {heading}\n", 1)[1]
    return FENCE.search(body).group(1)


def use_commands(block: str) -> list[tuple[str, str]]:
    """(command, trailing comment) per line."""
    out = []
    for line in block.strip().splitlines():
        command, _, comment = line.partition("  #")  # the comments sit after two or more spaces
        out.append((command.strip(), comment.strip()))
    return out


def check_output(comment: str, stdout: str) -> None:
    if comment.startswith('prints "'):
        assert comment[len('prints "'):-1] in stdout
    elif comment.startswith("last line: "):
        keys = re.findall(r'"(\w+)"', comment)
        last = json.loads(stdout.strip().splitlines()[-1])
        assert set(keys) <= set(last)


def shell(command: str, cwd: Path, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_readme_commands_run_in_order_in_a_fresh_clone(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    clone = tmp_path / "peftcli"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PEFT_DATA"] = str(SHARED_DATA)
    setup = section_block(readme, "Set up").strip()
    done = shell(setup, clone, env)
    assert done.returncode == 0, done.stderr[-2000:]
    timings = {}
    for command, comment in use_commands(section_block(readme, "Use")):
        start = time.perf_counter()
        done = shell(f". .venv/bin/activate && {command}", clone, env)
        timings[command] = round(time.perf_counter() - start, 1)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        check_output(comment, done.stdout)
    print(json.dumps(timings, indent=1))  # seconds per command, for docs/BENCHMARKS.md
