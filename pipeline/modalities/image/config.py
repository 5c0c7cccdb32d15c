"""params.yaml `image:`, what only an image run reads, by the stage that reads it; the shared
sections (data, validate, train, serve, ...) are pipeline/params.py's. Light: no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.modalities import Budget, sections


@dataclass(frozen=True)
class Ingest:
    source: str
    warped_items: int | None  # None only in cards from before the warped_digits source


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    channels: Literal[1, 3]
    background: int | list[int] | None  # params.yaml: 0..255 or [r, g, b]; None only in old cards


@dataclass(frozen=True)
class Validate:
    allow_resize: bool
    max_resize_factor: float
    max_blank_fraction: float


@dataclass(frozen=True)
class Augment:
    copies: int
    rotation_deg: float
    translate: float
    scale_min: float
    scale_max: float
    hflip: bool
    seed: int
    chunk: int


@dataclass(frozen=True)
class Train(Budget):  # model: pipeline/modalities/image/models.py MODELS
    epoch_augment: bool
    channels_last: bool
    cuda_graph: bool


@dataclass(frozen=True)
class Serve:
    max_image_pixels: int
    inline_decode_pixels: int


Recipe, Section = sections(__name__, Ingest, Preprocess, Validate, Augment, Train, Serve)


def _is_background(value) -> bool:
    """A gray level or [r, g, b], each 0..255; None (alpha dropped) is for old cards only."""
    levels = [value] if isinstance(value, int) else value if isinstance(value, list) else []
    return len(levels) == (1 if isinstance(value, int) else 3) and \
        all(0 <= v <= 255 for v in levels)


def checks(s: Section) -> list[tuple[str, bool, str]]:
    """(key under `image.`, holds, why not) for each range params.yaml must keep."""
    a = s.augment
    return [
        ("ingest.warped_items", (s.ingest.warped_items or 0) >= 1, "must be >= 1"),
        ("preprocess.image_size", s.preprocess.image_size >= 8, "must be >= 8"),
        ("preprocess.background", _is_background(s.preprocess.background),
         "must be a gray level 0..255 or [r, g, b] of 0..255"),
        ("validate.max_resize_factor", s.validate.max_resize_factor >= 1, "must be >= 1"),
        ("validate.max_blank_fraction", 0 <= s.validate.max_blank_fraction <= 1,
         "must be in [0, 1]"),
        ("augment.copies", a.copies >= 0, "must be >= 0"),
        ("augment.chunk", a.chunk >= 1, "must be >= 1"),
        ("augment.scale_min", 0 < a.scale_min <= a.scale_max,
         "must satisfy 0 < scale_min <= scale_max"),
        ("serve.max_image_pixels", s.serve.max_image_pixels >= 1, "must be >= 1"),
        ("serve.inline_decode_pixels",
         0 <= s.serve.inline_decode_pixels <= s.serve.max_image_pixels,
         "must be in [0, image.serve.max_image_pixels]"),
    ]
