"""The modality seam: what differs between images and texts, behind one interface.

data.modality in params.yaml names a modality, and a model card names its own
(recipe.data.modality). Each modality is a package pipeline/<name>/ whose modality.py defines
MODALITY, an object with the attributes and methods of `Modality` below. The stages keep their
steps and call the modality where the data differ; none of them branches on its name.

Adding a modality: write pipeline/<name>/ (its modality.py and the modules it calls, with their
tests), add its name to pipeline/params.py MODALITIES (data.modality accepts those) and its
preprocessing record to AnyPreprocessing below.

A modality's modality.py imports only light modules at its top (its preprocessing record,
numpy, pipeline.params): each method imports what its stage needs (torch, Great Expectations,
tokenizers) inside, so the validate stage does not import torch, nor the service torch or GX.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.image.preprocess import Preprocessing
from pipeline.params import MODALITIES
from pipeline.text.tokens import TextPreprocessing

if TYPE_CHECKING:
    from pipeline.card import ModelCard

# The records a model card's `preprocessing` may hold, one per modality (card.py reads it with
# the one its recipe.data.modality names).
AnyPreprocessing = Preprocessing | TextPreprocessing


class Modality(Protocol):
    """What a modality provides. Methods take the whole Params and read their own sections."""

    name: str                     # its data.modality value
    unit: str                     # what its items are called in counts and messages: "images"
    preprocessing: type           # the card's preprocessing record of its models
    model_files: tuple[str, ...]  # files beside the weights that travel with every model folder
                                  # (a text model's tokenizer.json), by name

    # --- ingest and validate ---------------------------------------------------------------

    # --- augment, train and compress -------------------------------------------------------

    # --- evaluate, package and serving -----------------------------------------------------


def get_modality(name: str) -> Modality:
    """The modality data.modality (or a card's recipe.data.modality) names."""
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r} (registered: {', '.join(MODALITIES)})")
    return importlib.import_module(f"pipeline.{name}.modality").MODALITY


def of_card(card: ModelCard) -> Modality:
    """The modality of a saved model."""
    return get_modality(card.recipe.data.modality)


def copy_model_files(modality: Modality, source: Path, target: Path) -> None:
    """Copy the files that travel with a model (Modality.model_files) from one model folder to
    the next."""
    import shutil

    for name in modality.model_files:
        shutil.copyfile(Path(source) / name, Path(target) / name)
