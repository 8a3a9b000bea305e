"""Image classification data: class-per-folder trees or an image column, decoded and normalised per batch."""
from __future__ import annotations

import io
from pathlib import Path

from ..errors import UserError
from .columns import label_ids

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# ViT's own normalisation (google/vit-base-patch16-224 preprocessor), used when the model folder names none.
DEFAULT_MEAN, DEFAULT_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def is_image_folder(spec: str) -> bool:
    """A folder whose sub-folders (one per class) hold image files."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return False
    return any(f.suffix.lower() in IMAGE_SUFFIXES for d in path.iterdir() if d.is_dir() for f in d.iterdir())


def folder_rows(spec: str, key: str) -> list[dict]:
    """One row per image: {"image": path, "label": its sub-folder's name}."""
    rows = [{"image": str(f), "label": d.name} for d in sorted(Path(spec).expanduser().iterdir()) if d.is_dir()
            for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise UserError(f"{key}: the folder {spec} has no images in class sub-folders")
    return rows


def open_image(source):
    """A PIL image from a path, raw bytes, or a datasets-style {"bytes": ..., "path": ...} record."""
    from PIL import Image

    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    return Image.open(Path(str(source)).expanduser())


def encode_images(rows: list[dict], key: str, column: str, label_column: str, labels: list[str]) -> list[dict]:
    """Rows -> {"image": source, "labels": id}; every image is opened once here so a bad file fails up front,
    while decoding to pixels waits for the batch (a dataset of decoded images would not fit in memory)."""
    from PIL import UnidentifiedImageError

    ids = label_ids(rows, label_column, labels, key)
    features = []
    for number, row in enumerate(rows, start=1):
        try:
            open_image(row[column]).verify()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UserError(f"{key}: row {number}: column '{column}' is not a readable image ({exc})") from None
        features.append({"image": row[column], "labels": ids[number - 1]})
    return features
