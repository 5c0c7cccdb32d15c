"""The one definition of how an image becomes model input.

Saved inside every model (model.json "preprocessing") and reused by evaluation and the server,
so whoever loads the model preprocesses exactly as training did. Needs only numpy and Pillow.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

_MODES = {1: "L", 3: "RGB"}
IMAGE_FORMATS = ["PNG", "JPEG"]  # what Kiln reads: validate checks files against it, the server
                                 # decodes uploads with it


@dataclass(frozen=True)
class Preprocessing:
    image_size: int       # px, square side the model sees
    channels: int         # 1 (grayscale) or 3 (RGB)
    mean: list[float]     # per channel, in [0, 1] pixel units
    std: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**d)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> uint8 (channels, size, size): converted, then resized bilinearly."""
        image = image.convert(_MODES[self.channels])
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def load(self, path: str | Path) -> np.ndarray:
        with Image.open(path) as image:
            return self.pixels(image)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 or [0, 255] float (N, channels, size, size) -> float32 model input."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return (pixels.astype(np.float32) / 255.0 - mean) / std
