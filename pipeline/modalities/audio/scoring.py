"""The audio modality's scoring part (pipeline/core/modality.py Scoring), for evaluate and package.

A split of the ingested clips is decoded through the card's AudioPreprocessing (pipeline.core.dataset
split_of: mono, the card's rate, fitted to its clip length), the waveforms the model and the
service's gRPC input take (the log-mel front end is inside the model). They are also the items
the package stage sends over gRPC (pipeline/modalities/audio/infra.py).

The baselines evaluate's gate measures the variants against (pipeline/core/baselines.py):

    baseline_majority  the train split's most frequent class
    baseline_logreg    logistic regression on each log-mel band's mean and standard deviation
                       over the clip (2 x audio.train.n_mels features, standardised on the train
                       split), by the model's own front end (pipeline/modalities/audio/logmel.py, the
                       card's audio.train.n_fft, hop and n_mels): a bag of frames, blind to order.
                       Served as one ONNX graph (front end, statistics, a linear layer with the
                       standardisation folded in) with the model's input `waveform`
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.baselines import (LOGREG_SETUP, Baseline, linear_logits, train_sample,
                                     linear_layer, logistic_regression, majority, scored,
                                     streamed)
from pipeline.core.dataset import Items, split_labels, split_of

if TYPE_CHECKING:
    from torch import nn

    from pipeline.core.card import ModelCard
    from pipeline.params import Params

FEATURE_BATCH = 256  # clips per front-end call while computing features (bounded memory)


def band_statistics(card: ModelCard) -> nn.Module:
    """waveform (N, S) -> (N, 2 x n_mels): each log-mel band's mean over the frames, then each
    band's standard deviation, by the model's front end with the card's settings."""
    import torch
    from torch import nn

    from pipeline.modalities.audio.logmel import LogMel

    class BandStatistics(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            a = card.recipe.section.train
            self.logmel = LogMel(card.preprocessing.sample_rate, a.n_fft, a.hop, a.n_mels)

        def forward(self, waveform: torch.Tensor) -> torch.Tensor:
            features = self.logmel(waveform)
            return torch.cat([features.mean(2), features.std(2)], dim=1)

    return BandStatistics().eval()


def baselines(data: Path, test: Items, card: ModelCard, params: Params) -> dict[str, Baseline]:
    """The majority class and logistic regression on log-mel band statistics, fitted on data's
    train split, scored on `test` (waveforms)."""
    import torch
    from torch import nn

    from pipeline.modalities.audio.export import export_onnx

    classes = len(card.classes)
    statistics = band_statistics(card)

    def features(waveforms: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([statistics(torch.from_numpy(waveforms[i:i + FEATURE_BATCH]))
                                   .numpy() for i in range(0, len(waveforms), FEATURE_BATCH)])

    train, train_labels = train_sample(data, card.preprocessing,
                                       params.evaluate.baseline_train_items, params.data.seed,
                                       features)
    mean, std = train.mean(0), train.std(0) + 1e-6
    model = logistic_regression((train - mean) / std, train_labels)
    weight, bias = linear_logits(model, classes)
    # (x - mean) / std inside the linear layer: W' = W / std, b' = b - W' @ mean
    weight, bias = weight / std, bias - (weight / std) @ mean

    def export(path: Path) -> None:
        export_onnx(nn.Sequential(statistics, linear_layer(weight, bias)), card.preprocessing,
                    path)

    a = card.recipe.section.train
    frames = 1 + card.preprocessing.clip_samples // a.hop
    bins = a.n_fft // 2 + 1
    frontend_macs = frames * (2 * bins * a.n_fft + a.n_mels * bins)  # STFT conv, mel MatMul
    def standardised(waves: np.ndarray) -> np.ndarray:
        return (features(waves) - mean) / std

    val = streamed(model, split_of(data, "val", card.preprocessing), standardised, classes)
    return {"baseline_majority": majority(split_labels(data, "train"), test.labels(), val[1],
                                          classes),
            "baseline_logreg": scored(
                model, f"{LOGREG_SETUP} on log-mel band means and deviations "
                f"({weight.shape[1]} features, standardised; {len(train_labels)} train clips)",
                streamed(model, test, standardised, classes), val, classes,
                macs=frontend_macs + weight.size, params=weight.size + bias.size,
                export=export)}
