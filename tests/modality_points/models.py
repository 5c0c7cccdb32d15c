"""The toy modality's model registry MODELS (points.train.model) and its side of training."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from pipeline.core.card import ModelCard
from pipeline.core.modality import FitRecipe, fit_recipe
from pipeline.core.registry import Registry
from pipeline.modalities.points.preprocess import PointsPreprocessing
from pipeline.params import Params

MODELS: Registry[Callable[[int, int, int], nn.Module]] = Registry("points.train.model")


@MODELS.register
def mlp(features: int, classes: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, classes))


def recipe(params: Params) -> FitRecipe:
    own = params.points.train
    return fit_recipe(params.train, own, channels_last=False, cuda_graph=False)


def torch_threads(params: Params) -> int | None:
    return None


def create(params: Params, prep: PointsPreprocessing, classes: int) -> nn.Module:
    own = params.points.train
    return MODELS.get(own.model)(prep.features, classes, own.hidden)


def architecture(params: Params) -> str:
    return params.points.train.model


def model_files(model: nn.Module) -> dict[str, bytes]:
    return {}


def rebuild(card: ModelCard, model_dir: Path) -> nn.Module:
    return MODELS.get(card.architecture)(card.preprocessing.features, len(card.classes),
                                         card.recipe.section.train.hidden)
