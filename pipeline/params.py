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

from pipeline.modalities import MODALITIES, part


class ParamsError(ValueError):
    """params.yaml does not match the schema; the message names the file and the key."""


# data.modality: each names a package pipeline/modalities/<name>/ (pipeline/core/modality.py, the
# seam) whose config.py types its section of params.yaml. Loading params imports every modality's
# config.py (light dataclasses) to check its section; `part` makes pipeline/core/import_closure.py
# count only the one in use, as its code only can change a run's outputs.
# image.train.model, text.train.model, audio.train.model and compress.prune_method are `str` here:
# load_params checks them against their registries (pipeline/core/registry.py), which live beside
# the torch code, by reading those files' source (declared_names), not importing them.
Modality = Literal[MODALITIES]


@dataclass(frozen=True)
class Split:
    train: float
    val: float
    test: float


@dataclass(frozen=True)
class DataParams:
    modality: Modality
    split: Split
    seed: int


@dataclass(frozen=True)
class IngestParams:
    max_file_bytes: int
    shard_items: int
    row_group_bytes: int
    item_column: str | None  # a records source's columns (pipeline/core/records.py)
    label_column: str
    split_column: str


@dataclass(frozen=True)
class ValidateParams:
    min_items: int
    max_items: int
    min_items_per_class_per_split: int


@dataclass(frozen=True)
class EngineParams:
    workers: int
    batch: int
    checkpoint_s: float
    cache_bytes: int
    loader_workers: int


@dataclass(frozen=True)
class DriftParams:
    psi_bins: int
    psi_warn: float
    psi_fail: float
    ks_warn: float
    ks_fail: float


@dataclass(frozen=True)
class TrainParams:
    """The recipe every modality trains with; its own train section adds the model, the budget,
    lr and batch size (FitRecipe, pipeline/core/modality.py, joins the two)."""
    optimizer: Literal["adam", "sgd"]
    momentum: float
    weight_decay: float
    patience: int
    monitor: Literal["val_loss", "val_acc"]
    seed: int
    lr_schedule: Literal["onecycle", "constant"]
    label_smoothing: float
    compile: bool
    processes: int
    shuffle_bytes: int


@dataclass(frozen=True)
class CompressParams:
    prune_method: str  # pipeline/core/pruning.py PRUNERS
    prune_amount: float
    finetune_epochs: int
    finetune_lr: float
    calibration_items: int
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
    infra_items: int


@dataclass(frozen=True)
class ServeParams:
    max_request_bytes: int
    workers: int
    batch_threads: int
    max_batch_items: int
    access_log: bool
    grpc_port: int
    idle_timeout_s: float
    header_timeout_s: float
    max_error_chars: int


@dataclass(frozen=True)
class ScheduleParams:
    deployment: str
    cron: str


SHARED = [("data", DataParams), ("ingest", IngestParams), ("validate", ValidateParams),
          ("engine", EngineParams), ("drift", DriftParams), ("train", TrainParams),
          ("compress", CompressParams), ("evaluate", EvaluateParams), ("gate", GateParams),
          ("package", PackageParams), ("serve", ServeParams), ("schedule", ScheduleParams)]
# Params: the shared sections, then one per modality typed by its config.Section (params.image...)
Params = dataclasses.make_dataclass(
    "Params", SHARED + [(m, part(m, "config").Section) for m in MODALITIES], frozen=True,
    namespace={"__module__": __name__})


def section(params: Params, modality: str | None = None):
    """The params section of `modality` (default: data.modality's), its config.Section."""
    return getattr(params, modality or params.data.modality)


def recipe_section(params: Params, modality: str | None = None):
    """What of that section a model card records (its config.Recipe: ingest, preprocess,
    augment, train): what made the weights."""
    s = section(params, modality)
    recipe = part(modality or params.data.modality, "config").Recipe
    return recipe(**{f.name: getattr(s, f.name) for f in dataclasses.fields(recipe)})


def _moved(name: str) -> str:
    """' (each modality's own now: ...)' for a key that left the shared sections for the
    modalities' (train.max_epochs, data.image_size, serve.max_text_bytes), else ''."""
    found = []
    for m in MODALITIES:
        for sub, kind in typing.get_type_hints(part(m, "config").Section).items():
            if sub == name:
                found.append(f"{m}.{sub}")
            found += [f"{m}.{sub}.{k}" for k in typing.get_type_hints(kind) if k == name]
    return f" (each modality's own now: {', '.join(sorted(found))})" if found else ""


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
            hint = _moved(unknown[0]) or did_you_mean(unknown[0], hints) or \
                f" (allowed: {', '.join(hints)})"
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


def _check_ranges(p: Params) -> None:
    checks = [
        ("data.split", abs(p.data.split.train + p.data.split.val + p.data.split.test - 1) < 1e-6,
         "fractions must sum to 1"),
        ("data.split", min(p.data.split.train, p.data.split.val, p.data.split.test) > 0,
         "every fraction must be > 0"),
        ("ingest.max_file_bytes", p.ingest.max_file_bytes >= 1, "must be >= 1"),
        ("package.infra_items", p.package.infra_items >= 1, "must be >= 1"),
        ("ingest.shard_items", p.ingest.shard_items >= 1, "must be >= 1"),
        ("ingest.row_group_bytes", p.ingest.row_group_bytes >= 1, "must be >= 1"),
        ("ingest.label_column", len({p.ingest.item_column, p.ingest.label_column,
                                     p.ingest.split_column}) == 3,
         "item_column, label_column and split_column must name three different columns"),
        ("ingest.label_column", all(c is None or c.strip() == c != "" for c in (
            p.ingest.item_column, p.ingest.label_column, p.ingest.split_column)),
         "item_column, label_column and split_column must be non-blank, without outer spaces"),
        ("validate.min_items", 1 <= p.validate.min_items <= p.validate.max_items,
         "must satisfy 1 <= min_items <= max_items"),
        ("validate.min_items_per_class_per_split", p.validate.min_items_per_class_per_split >= 0,
         "must be >= 0"),
        ("engine.workers", p.engine.workers >= 0, "must be >= 0 (0 = one per core)"),
        ("engine.batch", p.engine.batch >= 1, "must be >= 1 (items per task)"),
        ("engine.checkpoint_s", p.engine.checkpoint_s >= 0, "must be >= 0 (0 = every step)"),
        ("drift.psi_bins", p.drift.psi_bins >= 2, "must be >= 2"),
        ("drift.psi_warn", 0 <= p.drift.psi_warn <= p.drift.psi_fail,
         "must satisfy 0 <= psi_warn <= psi_fail"),
        ("drift.ks_warn", 0 <= p.drift.ks_warn <= p.drift.ks_fail,
         "must satisfy 0 <= ks_warn <= ks_fail"),
        ("train.patience", p.train.patience >= 1, "must be >= 1 (epochs)"),
        ("train.label_smoothing", 0 <= p.train.label_smoothing < 1, "must be in [0, 1)"),
        ("train.processes", p.train.processes >= 1, "must be >= 1"),
        ("train.shuffle_bytes", p.train.shuffle_bytes >= 0, "must be >= 0 (0: the whole split)"),
        ("engine.cache_bytes", p.engine.cache_bytes >= 0, "must be >= 0"),
        ("engine.loader_workers", p.engine.loader_workers >= 0, "must be >= 0"),
        ("compress.prune_amount", 0 <= p.compress.prune_amount < 1, "must be in [0, 1)"),
        ("compress.calibration_items", p.compress.calibration_items >= 1, "must be >= 1"),
        ("evaluate.latency_runs", p.evaluate.latency_runs >= 1, "must be >= 1"),
        ("evaluate.latency_batch_sizes", len(p.evaluate.latency_batch_sizes) > 0
         and min(p.evaluate.latency_batch_sizes) >= 1, "must be a non-empty list of sizes >= 1"),
        ("evaluate.baseline_train_items", p.evaluate.baseline_train_items >= 1, "must be >= 1"),
        ("gate.min_accuracy", p.gate.min_accuracy is None or 0 <= p.gate.min_accuracy <= 1,
         "must be in [0, 1], or null for no absolute floor"),
        ("gate.baseline_margin", 0 <= p.gate.baseline_margin <= 1, "must be in [0, 1]"),
        ("gate.max_accuracy_drop", 0 <= p.gate.max_accuracy_drop <= 1, "must be in [0, 1]"),
        ("package.champion_tolerance", 0 <= p.package.champion_tolerance <= 1,
         "must be in [0, 1]"),
        ("package.ready_timeout_s", p.package.ready_timeout_s > 0, "must be > 0"),
        ("package.model_name", re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", p.package.model_name)
         is not None, "must be lowercase letters, digits, '-', '_' or '.' (a BentoML model name)"),
        ("serve.max_request_bytes", p.serve.max_request_bytes >= 1024, "must be >= 1024"),
        ("serve.batch_threads", p.serve.batch_threads >= 1, "must be >= 1"),
        ("serve.workers", p.serve.workers >= 0, "must be >= 0 (0 = one per core)"),
        ("serve.max_batch_items", p.serve.max_batch_items >= 1, "must be >= 1"),
        ("serve.idle_timeout_s", p.serve.idle_timeout_s > 0, "must be > 0 (s)"),
        ("serve.header_timeout_s", p.serve.header_timeout_s > 0, "must be > 0 (s)"),
        ("serve.max_error_chars", p.serve.max_error_chars >= 80, "must be >= 80 (characters)"),
    ]
    for m in MODALITIES:  # each modality's budget (config.Budget), then its own ranges
        own = section(p, m).train
        checks += [(f"{m}.train.max_epochs", own.max_epochs >= 1, "must be >= 1"),
                   (f"{m}.train.lr", own.lr > 0, "must be > 0"),
                   (f"{m}.train.batch_size", own.batch_size >= 1, "must be >= 1")]
        checks += [(f"{m}.{key}", ok, why)
                   for key, ok, why in part(m, "config").checks(section(p, m))]
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
