"""Task metrics computed locally: accuracy, F1 (binary/macro/micro), MCC, Pearson/Spearman, entity F1."""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError
from .spans import ENTITY_METRICS, entity_scores
from .text_metrics import EVALUATE_PREFIX, GENERATION, check_metric_code, evaluate_metric

DEFAULT_METRICS = {
    "sequence-classification": ["accuracy", "f1"],
    "token-classification": ["accuracy", "f1_macro"],
    "causal-lm": ["loss", "perplexity"],
    "regression": ["pearson", "spearman"],
    "image-classification": ["accuracy", "f1"],
}
CLASSIFICATION = {"accuracy", "f1", "f1_macro", "f1_micro", "precision", "recall", "mcc"}
REGRESSION = {"pearson", "spearman", "mse"}
LM = {"loss", "perplexity"}
ENTITY = set(ENTITY_METRICS)  # token classification, span level (spans.py)
GENERATION_METRICS = set(GENERATION)  # causal LM, on generated text (text_metrics.py)
KNOWN = CLASSIFICATION | REGRESSION | LM | ENTITY | GENERATION_METRICS
# Trainer bookkeeping, not task metrics (the classification loss is not one of the recipe's metrics).
NOT_METRICS = {"loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time"}


def check_metrics(names: list[str], task: str, regression: bool, trust_code: bool = False) -> None:
    """`trust_code`: the recipe's eval.trust_metric_code, without which `evaluate:` metrics are refused."""
    allowed = LM | GENERATION_METRICS if task == "causal-lm" else (REGRESSION if regression else CLASSIFICATION)
    if task == "token-classification":
        allowed = allowed | ENTITY
    for name in names:
        if name.startswith(EVALUATE_PREFIX):
            check_metric_code(name, trust_code)  # on local disk and trusted, or a clear error: never a download
            continue
        if name not in allowed:
            raise UserError(f"eval.metrics: '{name}' does not apply to {task}{' (regression)' if regression else ''}; "
                            f"choose from {', '.join(sorted(allowed))}")


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, names: list[str], num_labels: int) -> dict:
    from sklearn import metrics as skm

    out = {}
    binary = num_labels == 2
    for name in names:
        if name == "accuracy":
            out[name] = float(skm.accuracy_score(labels, predictions))
        elif name == "f1":  # GLUE convention: F1 of the positive class for binary tasks, macro otherwise
            out[name] = float(skm.f1_score(labels, predictions, average="binary" if binary else "macro",
                                           zero_division=0))
        elif name in ("f1_macro", "f1_micro"):
            out[name] = float(skm.f1_score(labels, predictions, average=name[3:], zero_division=0))
        elif name in ("precision", "recall"):
            score = skm.precision_score if name == "precision" else skm.recall_score
            out[name] = float(score(labels, predictions, average="binary" if binary else "macro", zero_division=0))
        elif name == "mcc":
            out[name] = float(skm.matthews_corrcoef(labels, predictions))
    return out


def regression_metrics(predictions: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    from scipy import stats

    out = {}
    for name in names:
        if name == "pearson":
            out[name] = float(stats.pearsonr(predictions, labels)[0])
        elif name == "spearman":
            out[name] = float(stats.spearmanr(predictions, labels)[0])
        elif name == "mse":
            out[name] = float(np.mean((predictions - labels) ** 2))
    return out


def make_compute_metrics(task: str, names: list[str], num_labels: int | None, label_names: list[str] | None = None):
    """The Trainer's compute_metrics for a task; None for causal LM (loss comes from the Trainer itself).
    `label_names` (id order) are needed for entity-level metrics."""
    if task == "causal-lm":
        return None

    def compute(eval_prediction) -> dict:
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        if num_labels == 1:
            predictions, labels = logits.reshape(-1), labels.reshape(-1)
            out = regression_metrics(predictions, labels, names)
        else:
            predictions, out = logits.argmax(-1), {}
            if task == "token-classification":
                if ENTITY & set(names):
                    scores = entity_scores(*tag_sequences(predictions, labels, label_names))
                    out.update({k: v for k, v in scores.items() if k in names})
                keep = labels != -100
                predictions, labels = predictions[keep], labels[keep]
            out.update(classification_metrics(predictions, labels, names, num_labels))
        for name in names:
            if name.startswith(EVALUATE_PREFIX):
                out.update(evaluate_metric(name, predictions.tolist(), labels.tolist()))
        return out

    return compute


def tag_sequences(predictions: np.ndarray, labels: np.ndarray, label_names: list[str]):
    """(gold, predicted) tag-name sequences per row, over the positions that carry a label (first sub-tokens)."""
    gold, predicted = [], []
    for predicted_row, label_row in zip(predictions, labels):
        keep = label_row != -100
        gold.append([label_names[i] for i in label_row[keep]])
        predicted.append([label_names[i] for i in predicted_row[keep]])
    return gold, predicted


def lm_metrics(eval_loss: float) -> dict:
    return {"loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}
