"""Entity-level scores for token classification: spans from BIO/IOB2/IOBES tags, precision/recall/F1 per type."""
from __future__ import annotations

import re

from ..errors import UserError

TAG = re.compile(r"^(?:O|[BIES]-.+)$")
ENTITY_METRICS = ("entity_f1", "entity_precision", "entity_recall")


def check_tag_scheme(labels: list[str], where: str) -> None:
    """Entity metrics need tags of the form O, B-X, I-X (and E-X, S-X for IOBES)."""
    bad = [name for name in labels if not TAG.match(name)]
    if bad:
        raise UserError(f"{where}: entity metrics need BIO/IOBES tags (O, B-TYPE, I-TYPE, E-TYPE, S-TYPE); "
                        f"label {bad[0]!r} is not one: use accuracy/f1_macro, or rename the tags")


def _split(tag: str) -> tuple[str, str]:
    return ("O", "") if tag == "O" else (tag[0], tag[2:])


def _ends(prev: str, prev_type: str, tag: str, type_: str) -> bool:
    # conlleval's rules (as seqeval's default mode): a chunk ends at E/S, before B/S/O, or when the type changes.
    return prev in ("E", "S") or (prev in ("B", "I") and tag in ("B", "S", "O")) or \
        (prev != "O" and prev_type != type_)


def _starts(prev: str, prev_type: str, tag: str, type_: str) -> bool:
    # ... and starts at B/S, at an I/E that follows O/E/S (lenient IOB1), or when the type changes.
    return tag in ("B", "S") or (prev in ("E", "S", "O") and tag in ("I", "E")) or \
        (tag != "O" and prev_type != type_)


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first index, last index) of every entity span in one tag sequence."""
    found, start, kind = set(), None, ""
    prev, prev_type = "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):  # the trailing O closes a span that runs to the end
        prefix, type_ = _split(tag)
        if start is not None and _ends(prev, prev_type, prefix, type_):
            found.add((kind, start, i - 1))
            start = None
        if _starts(prev, prev_type, prefix, type_):
            start, kind = i, type_
        prev, prev_type = prefix, type_
    return found


def entity_counts(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, list[int]]:
    """type -> [correct, predicted, gold] span counts over all sequences."""
    counts: dict[str, list[int]] = {}
    for gold_tags, predicted_tags in zip(gold, predicted):
        gold_spans, predicted_spans = entities(gold_tags), entities(predicted_tags)
        for spans, slot in ((gold_spans & predicted_spans, 0), (predicted_spans, 1), (gold_spans, 2)):
            for kind, _, _ in spans:
                counts.setdefault(kind, [0, 0, 0])[slot] += 1
    return counts


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro-averaged entity precision/recall/F1: a span counts only when its type and both ends match."""
    totals = [sum(c[i] for c in entity_counts(gold, predicted).values()) for i in range(3)]
    return {f"entity_{k}": v for k, v in _prf(*totals).items()}


def entity_report(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, dict]:
    """Per entity type: precision, recall, F1 and support (gold spans)."""
    return {kind: {**_prf(*c), "support": c[2]} for kind, c in sorted(entity_counts(gold, predicted).items())}
