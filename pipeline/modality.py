"""The modality seam: what differs between images and texts, behind one interface per stage.

data.modality in params.yaml names a modality, and a model card names its own
(recipe.data.modality). A modality is a package pipeline/<name>/ holding one module per part
below, each providing the functions its Protocol lists; the stages keep their steps and call
`part(name, "<part>")` where the data differ. No stage branches on a modality's name, and none
imports a modality's modules directly.

    part        called by                          provides
    sources     ingest                             the source read into the ingested layout
    checks      validate                           the per-item table, its checks, the data
                                                   profile and drift, metrics, offender words
    (sections below, one per part, list the Protocols)

Adding a modality: write pipeline/<name>/ with these parts and their tests, add its name to
pipeline/params.py MODALITIES (data.modality accepts those) and its preprocessing record to
PREPROCESSING below.

`part` imports by name at run time, so pipeline/sources.py reads a `part(..., "<part>")` call as
an import of pipeline/<name>/<part>.py of every registered modality: a stage's dvc.yaml deps and
its checkpoint fingerprint cover the parts it can call, and no other modality code.
"""
from __future__ import annotations

import importlib
import shutil
import typing
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from pipeline.image.preprocess import Preprocessing
from pipeline.params import MODALITIES
from pipeline.text.tokens import TextPreprocessing

if TYPE_CHECKING:
    from pipeline.card import ModelCard

# The record a model card's `preprocessing` holds, per modality: how an item becomes model input.
PREPROCESSING = {"image": Preprocessing, "text": TextPreprocessing}
AnyPreprocessing = typing.Union[tuple(PREPROCESSING.values())]  # what a card may hold


def part(modality: str, name: str) -> ModuleType:
    """pipeline/<modality>/<name>.py: the part `name` of a registered modality."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (registered: {', '.join(MODALITIES)})")
    return importlib.import_module(f"pipeline.{modality}.{name}")


def card_part(card: ModelCard, name: str) -> ModuleType:
    """The part `name` of a saved model's modality."""
    return part(card.recipe.data.modality, name)


def copy_model_files(card: ModelCard, source: Path, target: Path) -> None:
    """Copy the files a model needs beside its weights (its preprocessing record's MODEL_FILES,
    a text model's tokenizer.json) from one model folder to the next."""
    for file in card.preprocessing.MODEL_FILES:
        shutil.copyfile(Path(source) / file, Path(target) / file)


# --- ingest and validate ---------------------------------------------------------------------

if TYPE_CHECKING:
    from pipeline.params import Params

# Names for the Protocols' annotations. This module imports no pandas nor pipeline/drift.py: the
# service imports it, and pipeline/sources.py counts every import, also one for type checking.
Table = typing.Any   # a pandas.DataFrame, one row per item
Drift = typing.Any   # pipeline/drift.py's DriftReport, or an object with its table() and metrics()
Expect = typing.Callable[..., dict]  # kind(key, fatal=True): an expectation's meta and severity


class Sources(Protocol):
    """pipeline/<modality>/sources.py, called by the ingest stage."""

    UNIT: str  # what the items are called in messages, plural: "images"

    def source(self, params: Params) -> str:
        """The source params names (data.source's value, ...), for the stage's summary line."""

    def ingest(self, params: Params, out: Path) -> list[dict]:
        """Write the items, manifest.csv and classes.json under `out`; return the manifest rows."""


class Checks(Protocol):
    """pipeline/<modality>/checks.py, called by the validate stage. Its table has the columns
    path, source, label, split, file_problem, decode_error, content_hash, leak and duplicate,
    which the stage's shared checks and offender words read, and what its own checks need. The
    drift metrics' `notes`, if any, are sentences validate and the flow's run summary print."""

    UNIT: str                  # the table's name and the class tables' count column: "images"
    KINDS: dict[str, str]      # problem key -> words starting its error line: its own checks'
                               # and the class checks' (empty_classes, short_class_splits)
    SUMMARY: tuple[str, ...]   # the keys of validate's --metrics JSON
    METRICS: tuple[str, ...]   # every key of validate's details JSON, in order

    def examine(self, folder: Path, rows: list[dict], params: Params, reference: dict | None
                ) -> tuple[Table, dict, Drift | None]:
        """(Item table of `rows`, profile of its train split, drift from `reference` or None)."""

    def suite(self, E: ModuleType, kind: Expect, params: Params, repeated, labels, splits
              ) -> list:
        """The table's GX expectations, the three shared manifest checks placed among them."""

    def drift_suite(self, E: ModuleType, kind: Expect, params: Params) -> list:
        """Expectations on the drift table beyond the shared PSI/KS ones."""

    def class_minimum(self, params: Params) -> tuple[int, str]:
        """(Items each class needs in each split, the params key that says so)."""

    def offenders(self, column: str, result: dict, table: Table) -> list[str] | None:
        """How the failed rows of a check on one of its own columns are named; None otherwise."""

    def metrics(self, table: Table, params: Params) -> dict:
        """The metrics the modality adds to the shared counts (keys of METRICS)."""

    def lines(self, metrics: dict, params: Params) -> list[str]:
        """Lines the stage prints after its summary (without the 'validate: ' prefix)."""


# --- augment, train and compress -------------------------------------------------------------


# --- evaluate, package and serving -----------------------------------------------------------
