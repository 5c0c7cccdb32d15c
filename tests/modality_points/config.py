"""params.yaml `points:` (the toy modality's section), one subsection per stage that reads it."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.modalities import Budget, sections


@dataclass(frozen=True)
class Ingest:
    source: str
    per_class: int
    features: int


@dataclass(frozen=True)
class Preprocess:
    standardize: bool


@dataclass(frozen=True)
class Validate:
    max_abs: float


@dataclass(frozen=True)
class Augment:
    copies: int
    noise: float
    seed: int


@dataclass(frozen=True)
class Train(Budget):  # model: models.py MODELS
    hidden: int


@dataclass(frozen=True)
class Serve:
    max_abs: float


Recipe, Section = sections(__name__, Ingest, Preprocess, Validate, Augment, Train, Serve)


def checks(s: Section) -> list[tuple[str, bool, str]]:
    """(key under `points.`, holds, why not) for each range params.yaml must keep."""
    return [
        ("ingest.per_class", s.ingest.per_class >= 10, "must be >= 10"),
        ("ingest.features", s.ingest.features >= 1, "must be >= 1"),
        ("validate.max_abs", s.validate.max_abs > 0, "must be > 0"),
        ("augment.copies", s.augment.copies >= 0, "must be >= 0"),
        ("augment.noise", s.augment.noise >= 0, "must be >= 0"),
        ("train.hidden", s.train.hidden >= 1, "must be >= 1"),
        ("serve.max_abs", s.serve.max_abs > 0, "must be > 0"),
    ]
