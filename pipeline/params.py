"""Typed view of params.yaml: unknown keys, wrong types and names no registry holds are rejected
with the key's name.

Constructors elsewhere take required arguments; the only defaults are the values in params.yaml.

Not pydantic (2.14, installed): its strict mode refuses a mapping for a dataclass field
(`dataclass_exact_type`) and its lax mode takes "10" and `true` for an int, and these sections,
the model card, the champion record and the Bento's arguments are stdlib dataclasses (replace,
asdict, read in the torch-free Bento too) that `typed` below reads with the key named.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml


class ParamsError(ValueError):
    """params.yaml does not match the schema; the message names the file and the key."""


# data.modality: each names a package pipeline/modalities/<name>/ (pipeline/core/modality.py, the seam)
MODALITIES = ("image", "text", "audio")
Modality = Literal[MODALITIES]
# train.model, text.model, audio.model and compress.prune_method are `str` here: load_params checks
# them against their registries (pipeline/core/registry.py), which live beside the torch code, by
# reading those files' source (declared_names), not importing them.


@dataclass(frozen=True)
class Split:
    train: float
    val: float
    test: float


@dataclass(frozen=True)
class DataParams:
    modality: Modality
    source: str
    split: Split
    seed: int
    image_size: int
    channels: Literal[1, 3]
    allow_resize: bool
    background: int | list[int] | None  # params.yaml: 0..255 or [r, g, b]; None only in old cards


@dataclass(frozen=True)
class IngestParams:
    max_file_bytes: int


@dataclass(frozen=True)
class ValidateParams:
    min_images: int
    max_images: int
    min_images_per_class_per_split: int
    max_resize_factor: float
    max_blank_fraction: float


@dataclass(frozen=True)
class EngineParams:
    workers: int
    batch: int


@dataclass(frozen=True)
class DriftParams:
    psi_bins: int
    psi_warn: float
    psi_fail: float
    ks_warn: float
    ks_fail: float


@dataclass(frozen=True)
class AugmentParams:
    copies: int
    rotation_deg: float
    translate: float
    scale_min: float
    scale_max: float
    hflip: bool
    seed: int
    chunk: int


@dataclass(frozen=True)
class TextAugmentParams:
    copies: int
    deletion: float
    swap: float
    mask: float
    seed: int


@dataclass(frozen=True)
class TextParams:
    source: str
    text_column: str
    label_column: str
    split_column: str
    per_class: int
    min_texts: int
    max_texts: int
    min_texts_per_class_per_split: int
    min_words: int
    max_words: int
    profile_words: int
    oov_warn: float
    oov_fail: float
    vocab_size: int
    max_tokens: int
    lowercase: bool
    model: str  # pipeline/modalities/text/models.py MODELS
    pretrained: str | None
    dim: int
    layers: int
    heads: int
    ffn: int
    dropout: float
    max_epochs: int
    lr: float
    batch_size: int
    threads: int
    augment: TextAugmentParams


@dataclass(frozen=True)
class AudioAugmentParams:
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
class AudioParams:
    source: str
    sample_rate: int
    clip_seconds: float
    voices: int
    takes: int
    speed_wpm: list[int]
    pitch: list[int]
    silent_rms: float
    min_clips: int
    max_clips: int
    min_clips_per_class_per_split: int
    min_seconds: float
    max_seconds: float
    clipped_samples: float
    max_clipped_share: float
    max_silent_share: float
    model: str  # pipeline/modalities/audio/models.py MODELS
    n_fft: int
    hop: int
    n_mels: int
    width: int
    max_epochs: int
    lr: float
    batch_size: int
    threads: int
    augment: AudioAugmentParams


@dataclass(frozen=True)
class TrainParams:
    model: str  # pipeline/modalities/image/models.py MODELS
    optimizer: Literal["adam", "sgd"]
    lr: float
    momentum: float
    weight_decay: float
    max_epochs: int
    patience: int
    monitor: Literal["val_loss", "val_acc"]
    batch_size: int
    seed: int
    lr_schedule: Literal["onecycle", "constant"]
    label_smoothing: float
    epoch_augment: bool
    channels_last: bool
    compile: bool
    cuda_graph: bool
    processes: int


@dataclass(frozen=True)
class CompressParams:
    prune_method: str  # pipeline/core/pruning.py PRUNERS
    prune_amount: float
    finetune_epochs: int
    finetune_lr: float
    calibration_images: int
    int8_per_channel: bool
    int8_reduce_range: bool


@dataclass(frozen=True)
class EvaluateParams:
    latency_runs: int
    latency_batch_sizes: list[int]
    threads: int
    baseline_train_items: int


@dataclass(frozen=True)
class GateParams:
    min_accuracy: float | None
    baseline_margin: float
    max_accuracy_drop: float
    policy: Literal["smallest", "most_accurate", "fastest"]


@dataclass(frozen=True)
class PackageParams:
    model_name: str
    champion_tolerance: float
    ready_timeout_s: float


@dataclass(frozen=True)
class ServeParams:
    max_request_bytes: int
    max_image_pixels: int
    inline_decode_pixels: int
    max_batch_images: int
    workers: int
    batch_threads: int
    access_log: bool
    grpc_port: int
    max_text_bytes: int
    max_audio_seconds: float
    idle_timeout_s: float
    header_timeout_s: float
    max_error_chars: int


@dataclass(frozen=True)
class ScheduleParams:
    deployment: str
    cron: str


@dataclass(frozen=True)
class Params:
    data: DataParams
    ingest: IngestParams
    validate: ValidateParams
    engine: EngineParams
    drift: DriftParams
    augment: AugmentParams
    train: TrainParams
    compress: CompressParams
    evaluate: EvaluateParams
    gate: GateParams
    package: PackageParams
    serve: ServeParams
    schedule: ScheduleParams
    text: TextParams
    audio: AudioParams


def did_you_mean(word, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices` to a misspelt `word`, else ''."""
    # cutoff 0.7, not difflib's 0.6: 'extra' would be taken for 'train' (0.6), while typos such
    # as 'trian' (0.8), 'epoch' for 'epochs' (0.91) and 'lenet6' (0.83) stay above it
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def typed(value, kind, key: str):
    """`value` (parsed YAML or JSON) checked against the annotation `kind` and converted: a
    dataclass from a mapping, recursively. Unknown or missing keys and wrong types raise
    ParamsError naming `key`, the value's dotted path, with the nearest allowed name for a
    misspelt one. Also reads model cards (pipeline/core/card.py)."""
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(kind)
        unknown = sorted(set(value) - set(hints), key=str)
        if unknown:
            what = "section" if kind is Params else "key"
            hint = did_you_mean(unknown[0], hints) or f" (allowed: {', '.join(hints)})"
            raise ParamsError(f"{key}.{unknown[0]}: unknown {what}{hint}")
        missing = [name for name in hints if name not in value]
        if missing:
            raise ParamsError(f"{key}.{missing[0]}: missing key")
        return kind(**{name: typed(value[name], hints[name], f"{key}.{name}") for name in hints})
    if kind is typing.Any:  # a model card's preprocessing: its modality's record reads it
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # `X | None`, `int | list[int]`
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:
            return typed(value, alternatives[0], key)
        for alternative in alternatives:
            try:
                return typed(value, alternative, key)
            except ParamsError:
                pass
        names = " or ".join(a.__name__ if isinstance(a, type) else str(a) for a in alternatives)
        raise ParamsError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in args or type(value) is not type(args[0]):
            raise ParamsError(f"{key}: expected one of {list(args)}, got {value!r}"
                              + did_you_mean(value, args))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        return [typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ParamsError(f"{key}: expected a mapping with string keys, got {value!r}")
        return {k: typed(v, args[1], f"{key}.{k}") for k, v in value.items()}
    # bool is an int in Python: check it first so `epochs: true` is refused.
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported annotation {kind} for {key}")
    if not ok:
        raise ParamsError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _is_background(value) -> bool:
    """A gray level or [r, g, b], each 0..255; None (alpha dropped) is for old cards only."""
    levels = [value] if isinstance(value, int) else value if isinstance(value, list) else []
    return len(levels) == (1 if isinstance(value, int) else 3) and \
        all(0 <= v <= 255 for v in levels)


def _is_range(value: list[float], low: float, high: float) -> bool:
    return len(value) == 2 and low <= value[0] <= value[1] <= high


def _check_ranges(p: Params) -> None:
    checks = [
        ("data.split", abs(p.data.split.train + p.data.split.val + p.data.split.test - 1) < 1e-6,
         "fractions must sum to 1"),
        ("data.split", min(p.data.split.train, p.data.split.val, p.data.split.test) > 0,
         "every fraction must be > 0"),
        ("data.image_size", p.data.image_size >= 8, "must be >= 8"),
        ("data.background", _is_background(p.data.background),
         "must be a gray level 0..255 or [r, g, b] of 0..255"),
        ("ingest.max_file_bytes", p.ingest.max_file_bytes >= 1, "must be >= 1"),
        ("validate.max_resize_factor", p.validate.max_resize_factor >= 1, "must be >= 1"),
        ("validate.max_blank_fraction", 0 <= p.validate.max_blank_fraction <= 1,
         "must be in [0, 1]"),
        ("engine.workers", p.engine.workers >= 0, "must be >= 0 (0 = one per core)"),
        ("engine.batch", p.engine.batch >= 1, "must be >= 1 (items per task)"),
        ("drift.psi_bins", p.drift.psi_bins >= 2, "must be >= 2"),
        ("drift.psi_warn", 0 <= p.drift.psi_warn <= p.drift.psi_fail,
         "must satisfy 0 <= psi_warn <= psi_fail"),
        ("drift.ks_warn", 0 <= p.drift.ks_warn <= p.drift.ks_fail,
         "must satisfy 0 <= ks_warn <= ks_fail"),
        ("augment.copies", p.augment.copies >= 0, "must be >= 0"),
        ("augment.chunk", p.augment.chunk >= 1, "must be >= 1"),
        ("augment.scale_min", 0 < p.augment.scale_min <= p.augment.scale_max,
         "must satisfy 0 < scale_min <= scale_max"),
        ("serve.batch_threads", p.serve.batch_threads >= 1, "must be >= 1"),
        ("serve.workers", p.serve.workers >= 0, "must be >= 0 (0 = one per core)"),
        ("train.max_epochs", p.train.max_epochs >= 1, "must be >= 1"),
        ("train.patience", p.train.patience >= 1, "must be >= 1 (epochs)"),
        ("train.batch_size", p.train.batch_size >= 1, "must be >= 1"),
        ("train.lr", p.train.lr > 0, "must be > 0"),
        ("train.label_smoothing", 0 <= p.train.label_smoothing < 1, "must be in [0, 1)"),
        ("train.processes", p.train.processes >= 1, "must be >= 1"),
        ("compress.prune_amount", 0 <= p.compress.prune_amount < 1, "must be in [0, 1)"),
        ("compress.calibration_images", p.compress.calibration_images >= 1, "must be >= 1"),
        ("evaluate.latency_runs", p.evaluate.latency_runs >= 1, "must be >= 1"),
        ("evaluate.latency_batch_sizes", len(p.evaluate.latency_batch_sizes) > 0
         and min(p.evaluate.latency_batch_sizes) >= 1, "must be a non-empty list of sizes >= 1"),
        ("gate.min_accuracy", p.gate.min_accuracy is None or 0 <= p.gate.min_accuracy <= 1,
         "must be in [0, 1], or null for no absolute floor"),
        ("gate.baseline_margin", 0 <= p.gate.baseline_margin <= 1, "must be in [0, 1]"),
        ("gate.max_accuracy_drop", 0 <= p.gate.max_accuracy_drop <= 1, "must be in [0, 1]"),
        ("evaluate.baseline_train_items", p.evaluate.baseline_train_items >= 1, "must be >= 1"),
        ("package.champion_tolerance", 0 <= p.package.champion_tolerance <= 1,
         "must be in [0, 1]"),
        ("package.ready_timeout_s", p.package.ready_timeout_s > 0, "must be > 0"),
        ("package.model_name", re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", p.package.model_name)
         is not None, "must be lowercase letters, digits, '-', '_' or '.' (a BentoML model name)"),
        ("serve.max_request_bytes", p.serve.max_request_bytes >= 1024, "must be >= 1024"),
        ("serve.max_image_pixels", p.serve.max_image_pixels >= 1, "must be >= 1"),
        ("serve.inline_decode_pixels", 0 <= p.serve.inline_decode_pixels <= p.serve.max_image_pixels,
         "must be in [0, serve.max_image_pixels]"),
        ("serve.max_batch_images", p.serve.max_batch_images >= 1, "must be >= 1"),
        ("serve.max_text_bytes", p.serve.max_text_bytes >= 1, "must be >= 1"),
        ("serve.max_audio_seconds", p.serve.max_audio_seconds > 0, "must be > 0 (s)"),
        ("serve.idle_timeout_s", p.serve.idle_timeout_s > 0, "must be > 0 (s)"),
        ("serve.header_timeout_s", p.serve.header_timeout_s > 0, "must be > 0 (s)"),
        ("serve.max_error_chars", p.serve.max_error_chars >= 80, "must be >= 80 (characters)"),
        ("text.text_column", len({p.text.text_column, p.text.label_column,
                                  p.text.split_column}) == 3,
         "text_column, label_column and split_column must name three different columns"),
        ("text.text_column", all(c.strip() == c != "" for c in (
            p.text.text_column, p.text.label_column, p.text.split_column)),
         "text_column, label_column and split_column must be non-blank, without outer spaces"),
        ("text.per_class", p.text.per_class >= 1, "must be >= 1"),
        ("text.min_texts", 1 <= p.text.min_texts <= p.text.max_texts,
         "must satisfy 1 <= min_texts <= max_texts"),
        ("text.min_words", 1 <= p.text.min_words <= p.text.max_words,
         "must satisfy 1 <= min_words <= max_words"),
        ("text.profile_words", p.text.profile_words >= 1, "must be >= 1"),
        ("text.oov_warn", 0 <= p.text.oov_warn <= p.text.oov_fail <= 1,
         "must satisfy 0 <= oov_warn <= oov_fail <= 1"),
        ("text.vocab_size", p.text.vocab_size >= 100, "must be >= 100"),
        ("text.max_tokens", p.text.max_tokens >= 2, "must be >= 2"),
        ("text.heads", p.text.heads >= 1 and p.text.dim % p.text.heads == 0,
         "must be >= 1 and divide text.dim"),
        ("text.dropout", 0 <= p.text.dropout < 1, "must be in [0, 1)"),
        ("text.max_epochs", p.text.max_epochs >= 1, "must be >= 1"),
        ("text.batch_size", p.text.batch_size >= 1, "must be >= 1"),
        ("text.threads", p.text.threads >= 1, "must be >= 1"),
        ("text.lr", p.text.lr > 0, "must be > 0"),
        ("text.augment.copies", p.text.augment.copies >= 0, "must be >= 0"),
        ("text.augment", all(0 <= r < 1 for r in (p.text.augment.deletion, p.text.augment.swap,
                                                   p.text.augment.mask)),
         "deletion, swap and mask must each be in [0, 1)"),
        ("audio.sample_rate", p.audio.sample_rate >= 1000, "must be >= 1000 (Hz)"),
        ("audio.clip_seconds", p.audio.clip_seconds > 0, "must be > 0"),
        ("audio.voices", p.audio.voices >= 3, "must be >= 3 (a voice is in one split only)"),
        ("audio.takes", p.audio.takes >= 1, "must be >= 1"),
        ("audio.speed_wpm", _is_range(p.audio.speed_wpm, 80, 450),
         "must be [min, max] with 80 <= min <= max <= 450 (eSpeak NG's words per minute)"),
        ("audio.pitch", _is_range(p.audio.pitch, 0, 99),
         "must be [min, max] with 0 <= min <= max <= 99 (eSpeak NG's pitch scale)"),
        ("audio.silent_rms", 0 <= p.audio.silent_rms < 1, "must be in [0, 1) (full scale 1)"),
        ("audio.min_clips", 1 <= p.audio.min_clips <= p.audio.max_clips,
         "must satisfy 1 <= min_clips <= max_clips"),
        ("audio.min_clips_per_class_per_split", p.audio.min_clips_per_class_per_split >= 0,
         "must be >= 0"),
        ("audio.min_seconds", 0 <= p.audio.min_seconds <= p.audio.max_seconds,
         "must satisfy 0 <= min_seconds <= max_seconds (s)"),
        ("audio.clipped_samples", 0 <= p.audio.clipped_samples < 1, "must be in [0, 1)"),
        ("audio.max_clipped_share", 0 <= p.audio.max_clipped_share <= 1, "must be in [0, 1]"),
        ("audio.max_silent_share", 0 <= p.audio.max_silent_share <= 1, "must be in [0, 1]"),
        ("audio.n_fft", p.audio.n_fft >= 16, "must be >= 16 (samples)"),
        ("audio.hop", 1 <= p.audio.hop <= p.audio.n_fft, "must be in [1, audio.n_fft] (samples)"),
        ("audio.n_mels", 1 <= p.audio.n_mels <= p.audio.n_fft // 2 + 1,
         "must be in [1, audio.n_fft / 2 + 1] (a mel band per FFT bin at most)"),
        ("audio.width", p.audio.width >= 1, "must be >= 1"),
        ("audio.max_epochs", p.audio.max_epochs >= 1, "must be >= 1"),
        ("audio.lr", p.audio.lr > 0, "must be > 0"),
        ("audio.batch_size", p.audio.batch_size >= 1, "must be >= 1"),
        ("audio.threads", p.audio.threads >= 1, "must be >= 1"),
        ("audio.augment.copies", p.audio.augment.copies >= 0, "must be >= 0"),
        ("audio.augment.gain_db", _is_range(p.audio.augment.gain_db, -60, 60),
         "must be [min, max] with -60 <= min <= max <= 60 (dB)"),
        ("audio.augment.shift_s", 0 <= p.audio.augment.shift_s < p.audio.clip_seconds,
         "must be in [0, audio.clip_seconds) (s)"),
        ("audio.augment.speed", _is_range(p.audio.augment.speed, 0.5, 2),
         "must be [min, max] with 0.5 <= min <= max <= 2 (playback rate)"),
        ("audio.augment.snr_db", _is_range(p.audio.augment.snr_db, -20, 100),
         "must be [min, max] with -20 <= min <= max <= 100 (dB)"),
        ("audio.augment", min(p.audio.augment.freq_masks, p.audio.augment.freq_mask_bins,
                              p.audio.augment.time_masks, p.audio.augment.time_mask_frames) >= 0,
         "freq_masks, freq_mask_bins, time_masks and time_mask_frames must each be >= 0"),
        ("audio.augment.freq_mask_bins", p.audio.augment.freq_mask_bins <= p.audio.n_mels,
         "must be <= audio.n_mels"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ParamsError(f"{key}: {why}")


def registry_files(modality: str) -> tuple[Path, ...]:
    """The files whose registries hold the names params.yaml gives when data.modality is
    `modality`: that modality's models (its model key) and the pruning methods
    (compress.prune_method). Another modality's model key is not read, so not checked."""
    package = Path(__file__).resolve().parent
    return package / "modalities" / modality / "models.py", package / "core" / "pruning.py"


def declared_names(file: Path) -> dict[str, list[str]]:
    """The registries `file` fills, read from its source, not imported (no torch, no seconds):
    {a registry's params key: its names in registration order}. A registry is a module-level
    `NAME = Registry("<key>")` (annotated or not; pipeline/core/registry.py), a name a module-level
    function or class decorated `@NAME.register`: its __name__, in the order the module runs
    them. tests/test_registry.py checks these equal the imported registries', every one."""
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    keys = {}  # variable -> params key
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Registry"
                and value.args and isinstance(value.args[0], ast.Constant)):
            keys.update((t.id, value.args[0].value) for t in targets if isinstance(t, ast.Name))
    names: dict[str, list[str]] = {key: [] for key in keys.values()}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Attribute) and decorator.attr == "register"
                        and isinstance(decorator.value, ast.Name) and decorator.value.id in keys):
                    names[keys[decorator.value.id]].append(node.name)
    return names


def _check_names(p: Params) -> None:
    """Every name `p` gives a registry is one it holds (the message as Registry.get's)."""
    for file in registry_files(p.data.modality):
        for key, names in declared_names(file).items():
            name = functools.reduce(getattr, key.split("."), p)
            if name not in names:
                raise ParamsError(f"{key}: expected one of {names}, got {name!r}"
                                  + did_you_mean(name, names))


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    try:
        params = typed(raw, Params, "params")
        _check_ranges(params)
        # The registry names, read from the registering files' source: reading a file is not an
        # import, so pipeline/core/import_closure.py does not count those files and they are no
        # dvc.yaml dep of a stage that does not run them. Rightly: their names decide only
        # whether params.yaml loads, never any output; a stage that uses a registry imports it.
        _check_names(params)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}".replace(": params.", ": ", 1)) from None
    return params


def as_dict(params) -> dict:
    """The resolved params, for saving inside artifacts."""
    return dataclasses.asdict(params)
