"""Checks and conversions of row columns shared by every data format: required columns, label ids."""
from __future__ import annotations

from ..errors import UserError


def require_columns(rows: list[dict], columns: list[str], key: str) -> None:
    """Every named column exists and is non-null in every row; errors name the row and the columns found."""
    found = list(rows[0].keys())
    for column in columns:
        if column not in rows[0]:
            raise UserError(f"{key}: column '{column}' not found; the data has columns: {', '.join(found)} "
                            f"(set the data.* column keys)")
    for number, row in enumerate(rows, start=1):
        for column in columns:
            if row.get(column) is None:
                raise UserError(f"{key}: row {number} has no value in column '{column}'")


def label_ids(rows, column, labels, key):
    if labels is None:  # regression: float targets
        out = []
        for number, row in enumerate(rows, start=1):
            try:
                out.append(float(row[column]))
            except (TypeError, ValueError):
                raise UserError(f"{key}: row {number}: label {row[column]!r} is not a number (regression)") from None
        return out
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for number, row in enumerate(rows, start=1):
        value = str(row[column])
        if value not in index:
            raise UserError(f"{key}: row {number}: label {value!r} is not one of the {len(labels)} labels "
                            f"{labels[:10]} (set model.labels to list them all)")
        out.append(index[value])
    return out
