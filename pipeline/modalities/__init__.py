"""One package per modality (data.modality), each holding the parts of the seam that
pipeline/core/modality.py lists. A folder here with a config.py is a modality: its name is a
data.modality value and a section of params.yaml, typed by that config.py."""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

MODALITIES = tuple(sorted(folder.name for folder in Path(__file__).parent.iterdir()
                          if (folder / "config.py").is_file()))


def part(modality: str, name: str) -> ModuleType:
    """pipeline/modalities/<modality>/<name>.py: the part `name` of a registered modality."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (registered: {', '.join(MODALITIES)})")
    return importlib.import_module(f"pipeline.modalities.{modality}.{name}")


@dataclass(frozen=True)
class Budget:
    """What every modality's train section holds first (its config.Train subclasses it): the
    model (a name in its models part's registry), the training budget, peak lr and batch size,
    which pipeline/core/modality.py fit_recipe joins with params.yaml train."""
    model: str
    max_epochs: int
    lr: float
    batch_size: int


def sections(module: str, ingest: type, preprocess: type, validate: type, augment: type,
             train: type, serve: type) -> tuple[type, type]:
    """(Recipe, Section) of the modality whose config.py is `module`, from the dataclass of each
    subsection of its params.yaml section, one per stage that reads it. Recipe: what a model card
    records, what made the weights (ingest, preprocess, augment, train); Section: the whole
    section, Recipe's and validate, serve."""
    def record(name, fields, bases=()):
        return dataclasses.make_dataclass(name, fields, bases=bases, frozen=True,
                                          namespace={"__module__": module})

    recipe = record("Recipe", [("ingest", ingest), ("preprocess", preprocess),
                               ("augment", augment), ("train", train)])
    return recipe, record("Section", [("validate", validate), ("serve", serve)], (recipe,))
