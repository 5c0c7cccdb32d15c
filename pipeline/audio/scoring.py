"""The audio modality's scoring part (pipeline/modality.py Scoring), for evaluate and package.

A split of the ingested clips is decoded through the card's AudioPreprocessing (pipeline.dataset
load_split: mono, the card's rate, fitted to its clip length), the waveforms the model and the
service's gRPC input take (the log-mel front end is inside the model). They are also the items
the package stage sends over gRPC (pipeline/audio/infra.py).

No baseline: evaluate reports the variants only. The gate's absolute floor is audio.min_accuracy
(gate.min_accuracy is the images').
"""
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
    """(float32 waveforms (N, clip_samples), int64 labels, the same waveforms) of one split, by
    the card's preprocessing (an audio model needs no file beside its weights)."""
    waveforms, labels = load_split(data, split, card.preprocessing)
    return waveforms, labels, waveforms


def baselines(data: Path, items: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    return {}


def floor(params: Params) -> tuple[float, str]:
    return params.audio.min_accuracy, "audio.min_accuracy"
