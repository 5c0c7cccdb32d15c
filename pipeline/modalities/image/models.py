"""The image model registry MODELS (image.train.model in params.yaml) and the image side of training:
the `models` part of the modality seam (pipeline/core/modality.py Models). Every model takes
float32 (N, channels, image_size, image_size) normalised pixels and returns logits (N, classes).

    lenet5        LeCun et al. 1998
    resnet_small  three residual stages, 16/32/64 channels wide
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.core.card import ModelCard
from pipeline.core.registry import Registry
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.core.modality import FitRecipe, fit_recipe
from pipeline.params import Params

MODELS: Registry[Callable[..., nn.Module]] = Registry("image.train.model")


def to_input(pixels: torch.Tensor | np.ndarray, prep: Preprocessing,
             device: torch.device) -> torch.Tensor:
    """uint8 pixels -> normalised float32 model input on `device`, via the saved preprocessing."""
    pixels = pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels
    return torch.from_numpy(prep.normalize(pixels)).to(device)


@MODELS.register
def lenet5(channels: int, classes: int, image_size: int) -> nn.Module:
    """LeCun et al. 1998: conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> fc 120 -> 84 -> classes."""
    side = ((image_size - 4) // 2 - 4) // 2  # 32 px in -> 5 px after two conv+pool
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes),
    )


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


@MODELS.register
def resnet_small(channels: int, classes: int, image_size: int) -> nn.Module:
    """Three stages of one residual block each (16, 32, 64 wide), halving resolution between."""
    def stage(cin: int, cout: int, downsample: bool) -> list[nn.Module]:
        head = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return head + ([nn.MaxPool2d(2)] if downsample else []) + [_Residual(cout)]

    return nn.Sequential(
        *stage(channels, 16, False), *stage(16, 32, True), *stage(32, 64, True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )


def build(name: str, channels: int, classes: int, image_size: int) -> nn.Module:
    return MODELS.get(name)(channels=channels, classes=classes, image_size=image_size)


# --- the Models part ---------------------------------------------------------------------------




def recipe(params: Params) -> FitRecipe:
    own = params.image.train
    return fit_recipe(params.train, own, channels_last=own.channels_last,
                      cuda_graph=own.cuda_graph)


def torch_threads(params: Params) -> int | None:
    return None  # torch's default: one per core


def create(params: Params, prep: Preprocessing, classes: int) -> nn.Module:
    return build(params.image.train.model, prep.channels, classes, prep.image_size)


def architecture(params: Params) -> str:
    return params.image.train.model





def model_files(model: nn.Module) -> dict[str, bytes]:
    return {}


def rebuild(card: ModelCard, model_dir: Path) -> nn.Module:
    prep = card.preprocessing
    return build(card.architecture, prep.channels, len(card.classes), prep.image_size)
