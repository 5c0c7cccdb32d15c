"""The toy modality's scoring part: the baselines (the majority class; logistic regression on
the standardised points, servable as one linear ONNX graph)."""
from __future__ import annotations

from pathlib import Path


from pipeline.core.baselines import (LOGREG_SETUP, Baseline, linear_logits, load_train_sample,
                                     linear_layer, logistic_regression, majority, scored,
                                     streamed)
from pipeline.core.dataset import load_split, split_labels


def baselines(data: Path, test, card, params) -> dict[str, Baseline]:
    prep, classes = card.preprocessing, len(card.classes)
    train, train_labels = load_train_sample(data, prep, params.evaluate.baseline_train_items,
                                            params.data.seed)
    val, val_labels = load_split(data, "val", prep)
    model = logistic_regression(prep.normalize(train), train_labels)
    weight, bias = linear_logits(model, classes)

    def export(path: Path) -> None:
        from pipeline.modalities.points.export import export_onnx

        export_onnx(linear_layer(weight, bias), prep, path)

    return {"baseline_majority": majority(split_labels(data, "train"), test.labels(), val_labels,
                                          classes),
            "baseline_logreg": scored(
                model, f"{LOGREG_SETUP} on the standardised points",
                streamed(model, test, prep.normalize, classes),
                (prep.normalize(val), val_labels), classes, macs=weight.size,
                params=weight.size + bias.size, export=export)}
