"""What an evaluation writes: the per-class report (JSON), the confusion-matrix PNG and predictions (JSONL)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..training.metrics import tag_sequences
from ..training.spans import entity_report

PER_CLASS = "per_class.json"
CONFUSION = "confusion_matrix.png"
MAX_ANNOTATED = 20  # beyond this many classes the cell numbers are unreadable: colours only


def per_class_report(predicted: np.ndarray, gold: np.ndarray, labels: list[str]) -> dict:
    """Precision/recall/F1/support per label name and the confusion matrix (rows: gold, columns: predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=ids, zero_division=0)
    classes = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                      "support": int(support[i])} for i, name in enumerate(labels)}
    matrix = confusion_matrix(gold, predicted, labels=ids)
    return {"labels": labels, "classes": classes, "confusion_matrix": matrix.tolist()}


def token_report(gold_tags: list[list[str]], predicted_tags: list[list[str]], labels: list[str]) -> dict:
    """Tag-level report over first sub-tokens plus the entity-level report per entity type."""
    index = {name: i for i, name in enumerate(labels)}
    gold = np.array([index[t] for row in gold_tags for t in row], dtype=np.int64)
    predicted = np.array([index[t] for row in predicted_tags for t in row], dtype=np.int64)
    report = per_class_report(predicted, gold, labels)
    if all(name == "O" or name[:2] in ("B-", "I-", "E-", "S-") for name in labels):
        report["entities"] = entity_report(gold_tags, predicted_tags)
    return report


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    values = np.array(matrix)
    size = min(3 + 0.45 * len(labels), 16)
    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(labels) <= MAX_ANNOTATED:
        threshold = values.max() / 2 if values.size else 0
        for (row, col), count in np.ndenumerate(values):
            ax.text(col, row, str(count), ha="center", va="center",
                    color="white" if count > threshold else "black", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def write_report(report: dict, folder: Path) -> None:
    """per_class.json and confusion_matrix.png in `folder` (next to the metrics)."""
    folder = Path(folder)
    atomic_write(folder / PER_CLASS, json.dumps(report, indent=2))
    plot_confusion(report["confusion_matrix"], report["labels"], folder / CONFUSION)


def write_predictions(rows: list[dict], path: str | Path) -> Path:
    path = Path(path).expanduser()
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def labels_report(task: str, logits: np.ndarray, label_ids: np.ndarray, labels: list[str]) -> dict:
    predicted = logits.argmax(-1)
    if task == "token-classification":
        return token_report(*tag_sequences(predicted, label_ids, labels), labels)
    return per_class_report(predicted, label_ids, labels)
