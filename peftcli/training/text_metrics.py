"""Generation metrics (exact match, ROUGE-L, BLEU, chrF) and `evaluate:<id>` metrics found on local disk only."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

GENERATION = ("exact_match", "rouge_l", "bleu", "chrf")
EVALUATE_PREFIX = "evaluate:"


def _normalise(text: str) -> str:
    return " ".join(text.split())


def generation_metrics(predictions: list[str], references: list[str], names) -> dict[str, float]:
    """exact_match and rouge_l in [0, 1]; bleu and chrf on sacrebleu's 0-100 scale (the published convention)."""
    out: dict[str, float] = {}
    if "exact_match" in names:
        hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references))
        out["exact_match"] = hits / max(len(references), 1)
    if "rouge_l" in names:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        out["rouge_l"] = sum(scores) / max(len(scores), 1)
    if "bleu" in names or "chrf" in names:
        import sacrebleu

        if "bleu" in names:
            out["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
        if "chrf" in names:
            out["chrf"] = float(sacrebleu.corpus_chrf(predictions, [references]).score)
    return out


def _modules_cache() -> Path:
    if os.environ.get("HF_MODULES_CACHE"):
        return Path(os.environ["HF_MODULES_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "modules"


def find_evaluate_metric(spec: str) -> Path:
    """The local script of `evaluate:<id>`: <id> is a folder holding <name>.py, a .py file, or a metric that
    `evaluate` already downloaded into its module cache. Never touches the network."""
    name = spec[len(EVALUATE_PREFIX):].strip()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".py":
        return path
    if path.is_dir() and (path / f"{path.name}.py").is_file():
        return path / f"{path.name}.py"
    cached = sorted((_modules_cache() / "evaluate_modules" / "metrics").glob(f"evaluate-metric--{name}/*/{name}.py"),
                    key=lambda p: p.stat().st_mtime)
    if cached:
        return cached[-1]
    raise UserError(f"eval.metrics: '{spec}' is not available locally (no script at {name}, none in the evaluate "
                    f"cache {_modules_cache()}); metrics are never downloaded at run time: give the path of its "
                    f"folder (evaluate:path/to/{path.name}) or use a built-in metric")


def check_metric_code(spec: str, trusted: bool) -> Path:
    """The script an `evaluate:` metric runs, found on disk, and refused unless the recipe trusts metric code:
    a metric script is arbitrary Python, so naming one in eval.metrics alone must not run it."""
    script = find_evaluate_metric(spec)
    if not trusted:
        raise UserError(f"eval.metrics: '{spec}' runs the Python script {script}, which can do anything your "
                        f"account can; set eval.trust_metric_code: true in the recipe if you trust it, or use a "
                        f"built-in metric")
    return script


def check_metrics_code(names, trusted: bool) -> None:
    """check_metric_code for every `evaluate:` metric among `names`."""
    for name in names:
        if name.startswith(EVALUATE_PREFIX):
            check_metric_code(name, trusted)


def evaluate_metric(spec: str, predictions: list, references: list) -> dict[str, float]:
    """Run a local `evaluate` metric; its result keys are prefixed with the metric's name when they differ."""
    script = find_evaluate_metric(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the script is local: nothing may reach for the hub
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    import evaluate

    try:
        metric = evaluate.load(str(script))
        result = metric.compute(predictions=predictions, references=references) or {}
    except Exception as exc:  # a third-party script may raise anything; the message is what helps
        raise UserError(f"eval.metrics: '{spec}' ({script}) failed: {' '.join(str(exc).split())[:300]}") from None
    stem = script.stem
    return {(key if key == stem else f"{stem}_{key}"): float(value) for key, value in result.items()
            if isinstance(value, (int, float))}
