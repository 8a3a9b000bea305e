"""Image classification data: class-per-folder trees or an image column, decoded and normalised per batch."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch

from .errors import UserError

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


@dataclasses.dataclass
class ImageInputs:
    """Turns images into the model's pixel_values: RGB or grey, resized, scaled to [0, 1], normalised."""

    height: int
    width: int
    channels: int
    mean: list[float]
    std: list[float]

    @classmethod
    def for_model(cls, model) -> "ImageInputs":
        from .models import load_config

        path, config = load_config(model)
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        saved = Path(path) / "preprocessor_config.json"
        settings = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
        mean = settings.get("image_mean", DEFAULT_MEAN)[:channels]
        std = settings.get("image_std", DEFAULT_STD)[:channels]
        return cls(height, width, channels, list(mean), list(std))

    def __call__(self, sources: list) -> torch.Tensor:
        import numpy as np

        mode = "L" if self.channels == 1 else "RGB"
        arrays = [np.asarray(open_image(s).convert(mode).resize((self.width, self.height)), dtype=np.float32)
                  for s in sources]
        pixels = torch.from_numpy(np.stack(arrays)).div_(255.0)
        pixels = pixels.unsqueeze(1) if self.channels == 1 else pixels.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        settings = {"image_mean": self.mean, "image_std": self.std, "do_normalize": True, "do_resize": True,
                    "do_rescale": True, "rescale_factor": 1 / 255, "size": {"height": self.height, "width": self.width},
                    "image_processor_type": "ViTImageProcessor"}
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


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

    from .tasks import _label_ids

    ids = _label_ids(rows, label_column, labels, key)
    features = []
    for number, row in enumerate(rows, start=1):
        try:
            open_image(row[column]).verify()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UserError(f"{key}: row {number}: column '{column}' is not a readable image ({exc})") from None
        features.append({"image": row[column], "labels": ids[number - 1]})
    return features


@dataclasses.dataclass
class ImageCollator:
    inputs: ImageInputs

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.inputs([f["image"] for f in features]),
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}
