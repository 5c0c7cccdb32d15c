"""The image modality's scoring part (pipeline/modality.py Scoring): a split of the ingested
images as model input, for evaluate and package. No baselines: evaluate reports the variants
only."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.dataset import load_split

if TYPE_CHECKING:
    from pipeline.card import ModelCard
    from pipeline.params import Params


def split_input(data: Path, split: str, model_dir: Path, card: ModelCard
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 model input (N, C, S, S), int64 labels, uint8 pixels (N, C, S, S)) of one split,
    by the card's preprocessing (an image model needs no file beside its weights)."""
    pixels, labels = load_split(data, split, card.preprocessing)
    return card.preprocessing.normalize(pixels), labels, pixels


def baselines(data: Path, items: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    return {}


def floor(params: Params) -> tuple[float, str]:
    return params.gate.min_accuracy, "gate.min_accuracy"
