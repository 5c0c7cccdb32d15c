"""Model registry: every architecture is addressable by name (`train.model` in params.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline import StageError
from pipeline.card import ModelCard, read_card
from pipeline.text import models as text_models
from pipeline.text.tokens import TextPreprocessing

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    MODELS[builder.__name__] = builder
    return builder


@register
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


@register
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
    if name not in MODELS:
        raise StageError(f"train.model: unknown model {name!r} (registered: {', '.join(MODELS)})")
    return MODELS[name](channels=channels, classes=classes, image_size=image_size)


def load(model_dir: Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild a saved model from its card (model_dir/model.json) and the one safetensors
    weights file the card lists, checked against its sha256 first (a text model's from
    pipeline/text/models.py)."""
    card = read_card(model_dir)
    if isinstance(card.preprocessing, TextPreprocessing):
        return text_models.load(model_dir, card)
    (weights,) = card.weights
    prep = card.preprocessing
    model = build(card.architecture, prep.channels, len(card.classes), prep.image_size)
    model.load_state_dict(load_file(model_dir / weights))
    return model.eval(), card
