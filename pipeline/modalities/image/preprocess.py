"""The one definition of how an image becomes model input.

Saved inside every model (model.json "preprocessing") and reused by validation, augmentation,
evaluation and the server, so whoever loads the model preprocesses exactly as training did.
Needs only numpy and Pillow.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MODES = {1: "L", 3: "RGB"}  # image.preprocess.channels -> the PIL mode the model's pixels are in
# What Kiln reads, by PIL's plugin names: ingest takes files named like one (IMAGE_SUFFIXES),
# validate decodes them with these plugins only, the server decodes uploads with them. A camera
# JPEG that carries more pictures after its main one (MPO: a preview, a depth map) opens through
# the JPEG plugin and is read as its main picture.
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"]
ACCEPTED = "PNG, JPEG, WebP, BMP, TIFF or GIF"  # how messages name IMAGE_FORMATS
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# PIL modes of one 16-bit (or wider) integer channel: 16-bit grayscale PNGs open as one of these.
_WIDE_GRAY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA = {"RGBA", "LA", "PA"}  # with an alpha channel, as PNG decodes them


def refusal(image: Image.Image) -> tuple[str, str] | None:
    """(kind, why) an opened, not yet decoded image that PIL reads is still not one Kiln takes;
    None for the rest. Several frames (an animated GIF, WebP or PNG, a multi-page TIFF): which
    one is the picture to learn from or classify is not Kiln's guess to make. 32-bit float
    pixels (scientific TIFFs): their range is unknown, so no mapping to 0..255 is right.
    Validate and the server refuse the same images with the same words."""
    if image.format != "MPO" and getattr(image, "is_animated", False):
        what = ("pages (a multi-page TIFF)" if image.format == "TIFF" else
                f"frames (an animated {image.format})")
        return ("several frames", f"several {what}: Kiln takes one picture per file; save the "
                                  "one you mean as a file of its own")
    if image.mode == "F":
        return ("unconvertible pixels", "32-bit float pixels, whose range Kiln cannot know: "
                                        "save it with 8- or 16-bit pixels")
    return None


def to_channels(image: Image.Image, channels: int, background: int | list[int] | None
                ) -> Image.Image:
    """Any image PIL decodes -> 8-bit "L" (channels 1) or "RGB" (channels 3), same size.

    16-bit gray is scaled to 8 bits (value >> 8, so the whole range maps, nothing is clipped);
    palette images are expanded (via RGBA when they have a transparent colour); alpha is
    composited over `background` (a gray level or [r, g, b], 0..255; None drops alpha, as cards
    from before image.preprocess.background did); CMYK and the rest go through PIL's own conversion.
    """
    target = MODES[channels]
    if image.mode == target:
        return image
    if image.mode in _WIDE_GRAY:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(np.minimum(wide >> 8, 255).astype(np.uint8), mode="L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA and background is not None:
        rgb = (background,) * 3 if isinstance(background, int) else tuple(background)
        image = Image.alpha_composite(Image.new("RGBA", image.size, (*rgb, 255)),
                                      image.convert("RGBA"))
    return image.convert(target)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int       # px, square side the model sees
    channels: int         # 1 (grayscale) or 3 (RGB)
    mean: list[float]     # per channel, in [0, 1] pixel units
    std: list[float]
    # image.preprocess.background: what transparent pixels are composited on. None drops alpha, as Kiln did
    # before image.preprocess.background existed (pipeline/core/card.py reads such cards with None).
    background: int | list[int] | None = None

    UNIT = "images"   # what the items are called in counts and messages (not a field)
    MODEL_FILES = ()  # files beside the weights a model folder needs besides them (not a field)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**d)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> uint8 (channels, size, size): converted, then resized bilinearly."""
        image = to_channels(image, self.channels, self.background)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def load(self, source: str | Path | bytes) -> np.ndarray:
        """An image file (path or bytes: an ingested item) -> uint8 (channels, size, size)."""
        file = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(file, formats=IMAGE_FORMATS) as image:
            return self.pixels(image)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 or [0, 255] float (N, channels, size, size) -> float32 model input."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return (pixels.astype(np.float32) / 255.0 - mean) / std


RECORD = Preprocessing  # the modality seam's `preprocess` part (pipeline/core/modality.py)
