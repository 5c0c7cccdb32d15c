"""params.yaml `text:`, what only a text run reads, by the stage that reads it; the shared
sections (data, validate, train, serve, ...) are pipeline/params.py's. Light: no torch."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.modalities import Budget, sections


@dataclass(frozen=True)
class Ingest:
    source: str
    per_class: int


@dataclass(frozen=True)
class Preprocess:
    vocab_size: int
    max_tokens: int
    lowercase: bool
    pretrained: str | None


@dataclass(frozen=True)
class Validate:
    min_words: int
    max_words: int
    profile_words: int
    oov_warn: float
    oov_fail: float


@dataclass(frozen=True)
class Augment:
    copies: int
    deletion: float
    swap: float
    mask: float
    seed: int


@dataclass(frozen=True)
class Train(Budget):  # model: pipeline/modalities/text/models.py MODELS
    dim: int
    layers: int
    heads: int
    ffn: int
    dropout: float
    threads: int


@dataclass(frozen=True)
class Serve:
    max_text_bytes: int


Recipe, Section = sections(__name__, Ingest, Preprocess, Validate, Augment, Train, Serve)


def checks(s: Section) -> list[tuple[str, bool, str]]:
    """(key under `text.`, holds, why not) for each range params.yaml must keep."""
    v, a, t = s.validate, s.augment, s.train
    return [
        ("ingest.per_class", s.ingest.per_class >= 1, "must be >= 1"),
        ("preprocess.vocab_size", s.preprocess.vocab_size >= 100, "must be >= 100"),
        ("preprocess.max_tokens", s.preprocess.max_tokens >= 2, "must be >= 2"),
        ("validate.min_words", 1 <= v.min_words <= v.max_words,
         "must satisfy 1 <= min_words <= max_words"),
        ("validate.profile_words", v.profile_words >= 1, "must be >= 1"),
        ("validate.oov_warn", 0 <= v.oov_warn <= v.oov_fail <= 1,
         "must satisfy 0 <= oov_warn <= oov_fail <= 1"),
        ("augment.copies", a.copies >= 0, "must be >= 0"),
        ("augment", all(0 <= r < 1 for r in (a.deletion, a.swap, a.mask)),
         "deletion, swap and mask must each be in [0, 1)"),
        ("train.heads", t.heads >= 1 and t.dim % t.heads == 0,
         "must be >= 1 and divide text.train.dim"),
        ("train.dropout", 0 <= t.dropout < 1, "must be in [0, 1)"),
        ("train.threads", t.threads >= 1, "must be >= 1"),
        ("serve.max_text_bytes", s.serve.max_text_bytes >= 1, "must be >= 1"),
    ]
