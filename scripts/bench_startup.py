#!/usr/bin/env python3
"""Start-up time of the commands that do not train (issue #24): `peft --help`, `peft methods`, `peft validate`.

Each command runs as a fresh subprocess (so every run pays the whole import cost, as a user does); the table
gives the median wall time of --runs runs and the warnings seen on stderr. Target: <= 2 s each on 2 idle cores
and no warning (a warning about an optional backend is a sign that it was imported without being used).

  PEFT_DATA=/work/shared/data python scripts/bench_startup.py            # --runs 5 --recipe recipes/quickstart.yaml

Prints a Markdown table; exits 1 when a command fails or warns, or with --budget when a median exceeds it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A warning line from logging (`WARNING name: ...`), the warnings module (`...: UserWarning: ...`) or a library's own
# prefix; stderr of these commands is otherwise empty.
WARNING_MARKERS = ("WARNING", "Warning:", "warning:", "warn(")


def peft_executable() -> list[str]:
    """The installed `peft` entry point next to this interpreter (what users run), else `python -m peftcli`."""
    beside = Path(sys.executable).with_name("peft")
    found = str(beside) if beside.exists() else shutil.which("peft")
    return [found] if found else [sys.executable, "-m", "peftcli"]


def time_command(args: list[str], runs: int) -> tuple[list[float], list[str], int]:
    """Wall times of `runs` fresh runs, the distinct warning lines they printed, and the last exit code."""
    seconds, warnings, code = [], [], 0
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=os.environ.copy())
        seconds.append(time.perf_counter() - started)
        code = done.returncode
        for line in done.stderr.splitlines():
            if any(marker in line for marker in WARNING_MARKERS) and line not in warnings:
                warnings.append(line)
    return seconds, warnings, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per command (the median is reported)")
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", help="recipe for `peft validate`")
    parser.add_argument("--budget", type=float, default=None, help="fail when a median exceeds this many seconds")
    args = parser.parse_args()
    peft = peft_executable()
    commands = {"peft --help": ["--help"], "peft methods": ["methods"], f"peft validate {args.recipe}":
                ["validate", args.recipe]}
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{args.runs} runs each\n")
    print("| command | median s | min s | max s | exit | warnings on stderr |")
    print("|---|---|---|---|---|---|")
    failed = False
    for label, extra in commands.items():
        seconds, warnings, code = time_command(peft + extra, args.runs)
        median = statistics.median(seconds)
        shown = "; ".join(w[:120] for w in warnings) or "none"
        print(f"| `{label}` | {median:.2f} | {min(seconds):.2f} | {max(seconds):.2f} | {code} | {shown} |")
        failed |= code != 0 or bool(warnings) or (args.budget is not None and median > args.budget)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
