"""The image modality's scoring part (pipeline/core/modality.py Scoring): the baselines evaluate's
gate measures the variants against (pipeline/core/baselines.py), scored on the test split's
stream of pixels (pipeline/core/dataset.py split_of):

    baseline_majority  the train split's most frequent class
    baseline_logreg    logistic regression on the normalised pixels, the model's own input
                       (channels x image_size^2 features): served as one ONNX graph (Flatten
                       and a linear layer, exported like the image models) with the model's
                       input `input`, so a baseline that beats every variant serves unchanged
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
    from pipeline.core.card import ModelCard
    from pipeline.params import Params


def baselines(data: Path, test: Items, card: ModelCard, params: Params) -> dict[str, Baseline]:
    """The majority class and logistic regression on the normalised pixels, fitted on data's
    train split, scored on `test` (uint8 pixels)."""
    prep, classes = card.preprocessing, len(card.classes)

    def features(pixels: np.ndarray) -> np.ndarray:
        return prep.normalize(pixels).reshape(len(pixels), -1)

    train, train_labels = train_sample(data, prep, params.evaluate.baseline_train_items,
                                       params.data.seed, features)
    model = logistic_regression(train, train_labels)
    val = streamed(model, split_of(data, "val", prep), features, classes)
    weight, bias = linear_logits(model, classes)

    def export(path: Path) -> None:
        from torch import nn

        from pipeline.modalities.image.export import export_onnx

        export_onnx(nn.Sequential(nn.Flatten(), linear_layer(weight, bias)), prep, path)

    return {"baseline_majority": majority(split_labels(data, "train"), test.labels(), val[1],
                                          classes),
            "baseline_logreg": scored(
                model, f"{LOGREG_SETUP} on the normalised pixels ({weight.shape[1]} features, "
                f"{len(train_labels)} train images)", streamed(model, test, features, classes),
                val, classes, macs=weight.size,
                params=weight.size + bias.size, export=export)}
