"""The image "tokenizer" of image-classification models: images to pixel_values at the model's size and
normalisation (read from its config and preprocessor_config.json)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..data.images import DEFAULT_MEAN, DEFAULT_STD, open_image


@dataclasses.dataclass
class ImageInputs:
    """Turns images into the model's pixel_values: RGB or grey, resized, scaled to [0, 1], normalised."""

    height: int
    width: int
    channels: int
    mean: list[float]
    std: list[float]

    @classmethod
    def for_model(cls, path: str, config) -> "ImageInputs":
        """From the model folder's config (image size, channels) and preprocessor_config.json, if any."""
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
