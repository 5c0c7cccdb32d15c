"""params.yaml `audio:`, what only an audio run reads, by the stage that reads it; the shared
sections (data, validate, train, serve, ...) are pipeline/params.py's. Light: no torch."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.modalities import Budget, sections


@dataclass(frozen=True)
class Ingest:
    source: str
    voices: int
    takes: int
    speed_wpm: list[int]
    pitch: list[int]


@dataclass(frozen=True)
class Preprocess:
    sample_rate: int
    clip_seconds: float
    silent_rms: float


@dataclass(frozen=True)
class Validate:
    min_seconds: float
    max_seconds: float
    clipped_samples: float
    max_clipped_share: float
    max_silent_share: float


@dataclass(frozen=True)
class Augment:
    copies: int
    per_epoch: bool
    gain_db: list[float]
    shift_s: float
    speed: list[float]
    snr_db: list[float]
    freq_masks: int
    freq_mask_bins: int
    time_masks: int
    time_mask_frames: int
    seed: int


@dataclass(frozen=True)
class Train(Budget):  # model: pipeline/modalities/audio/models.py MODELS
    n_fft: int
    hop: int
    n_mels: int
    width: int
    threads: int
    cuda_graph: bool


@dataclass(frozen=True)
class Serve:
    max_seconds: float


Recipe, Section = sections(__name__, Ingest, Preprocess, Validate, Augment, Train, Serve)


def _is_range(value: list[float], low: float, high: float) -> bool:
    return len(value) == 2 and low <= value[0] <= value[1] <= high


def checks(s: Section) -> list[tuple[str, bool, str]]:
    """(key under `audio.`, holds, why not) for each range params.yaml must keep."""
    i, p, v, a, t = s.ingest, s.preprocess, s.validate, s.augment, s.train
    return [
        ("ingest.voices", i.voices >= 3, "must be >= 3 (a voice is in one split only)"),
        ("ingest.takes", i.takes >= 1, "must be >= 1"),
        ("ingest.speed_wpm", _is_range(i.speed_wpm, 80, 450),
         "must be [min, max] with 80 <= min <= max <= 450 (eSpeak NG's words per minute)"),
        ("ingest.pitch", _is_range(i.pitch, 0, 99),
         "must be [min, max] with 0 <= min <= max <= 99 (eSpeak NG's pitch scale)"),
        ("preprocess.sample_rate", p.sample_rate >= 1000, "must be >= 1000 (Hz)"),
        ("preprocess.clip_seconds", p.clip_seconds > 0, "must be > 0"),
        ("preprocess.silent_rms", 0 <= p.silent_rms < 1, "must be in [0, 1) (full scale 1)"),
        ("validate.min_seconds", 0 <= v.min_seconds <= v.max_seconds,
         "must satisfy 0 <= min_seconds <= max_seconds (s)"),
        ("validate.clipped_samples", 0 <= v.clipped_samples < 1, "must be in [0, 1)"),
        ("validate.max_clipped_share", 0 <= v.max_clipped_share <= 1, "must be in [0, 1]"),
        ("validate.max_silent_share", 0 <= v.max_silent_share <= 1, "must be in [0, 1]"),
        ("augment.copies", a.copies >= 0, "must be >= 0"),
        ("augment.gain_db", _is_range(a.gain_db, -60, 60),
         "must be [min, max] with -60 <= min <= max <= 60 (dB)"),
        ("augment.shift_s", 0 <= a.shift_s < p.clip_seconds,
         "must be in [0, audio.preprocess.clip_seconds) (s)"),
        ("augment.speed", _is_range(a.speed, 0.5, 2),
         "must be [min, max] with 0.5 <= min <= max <= 2 (playback rate)"),
        ("augment.snr_db", _is_range(a.snr_db, -20, 100),
         "must be [min, max] with -20 <= min <= max <= 100 (dB)"),
        ("augment", min(a.freq_masks, a.freq_mask_bins, a.time_masks, a.time_mask_frames) >= 0,
         "freq_masks, freq_mask_bins, time_masks and time_mask_frames must each be >= 0"),
        ("augment.freq_mask_bins", a.freq_mask_bins <= t.n_mels,
         "must be <= audio.train.n_mels"),
        ("train.n_fft", t.n_fft >= 16, "must be >= 16 (samples)"),
        ("train.hop", 1 <= t.hop <= t.n_fft, "must be in [1, audio.train.n_fft] (samples)"),
        ("train.n_mels", 1 <= t.n_mels <= t.n_fft // 2 + 1,
         "must be in [1, audio.train.n_fft / 2 + 1] (a mel band per FFT bin at most)"),
        ("train.width", t.width >= 1, "must be >= 1"),
        ("train.threads", t.threads >= 1, "must be >= 1"),
        ("serve.max_seconds", s.serve.max_seconds > 0, "must be > 0 (s)"),
    ]
