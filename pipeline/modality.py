"""The modality seam: what differs between images and texts, behind one interface per stage.

data.modality in params.yaml names a modality, and a model card names its own
(recipe.data.modality). A modality is a package pipeline/<name>/ holding one module per part
below, each providing the functions its Protocol lists; the stages keep their steps and call
`part(name, "<part>")` where the data differ. No stage branches on a modality's name, and none
imports a modality's modules directly.

    part        called by                          provides
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


# --- augment, train and compress -------------------------------------------------------------


# --- evaluate, package and serving -----------------------------------------------------------
