"""The toy modality's model registry MODELS (points.train.model) and its side of training."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.core.card import ModelCard
from pipeline.core.dataset import load_split
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


def train_inputs(tensors: dict[str, torch.Tensor], prep: PointsPreprocessing,
                 device: torch.device) -> torch.Tensor:
    return tensors["points"].to(device)


def epoch_inputs(tensors, prep, params, device, memory_format) -> None:
    return None


def val_split(data: Path, augmented: Path, prep: PointsPreprocessing,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    points, labels = load_split(data, "val", prep)
    return torch.from_numpy(prep.normalize(points)).to(device), torch.from_numpy(labels).to(device)


def model_files(model: nn.Module) -> dict[str, bytes]:
    return {}


def rebuild(card: ModelCard, model_dir: Path) -> nn.Module:
    return MODELS.get(card.architecture)(card.preprocessing.features, len(card.classes),
                                         card.recipe.section.train.hidden)
