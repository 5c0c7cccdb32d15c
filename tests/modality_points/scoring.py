"""The toy modality's scoring part: the baselines (the majority class; logistic regression on
the standardised points, servable as one linear ONNX graph)."""
from __future__ import annotations

from pathlib import Path


from pipeline.core.baselines import (LOGREG_SETUP, Baseline, linear_logits, train_sample,
                                     linear_layer, logistic_regression, majority, scored,
                                     streamed)
from pipeline.core.dataset import split_labels, split_of


def baselines(data: Path, test, card, params) -> dict[str, Baseline]:
    prep, classes = card.preprocessing, len(card.classes)
    train, train_labels = train_sample(data, prep, params.evaluate.baseline_train_items,
                                       params.data.seed, prep.normalize)
    model = logistic_regression(train, train_labels)
    val = streamed(model, split_of(data, "val", prep), prep.normalize, classes)
    weight, bias = linear_logits(model, classes)

    def export(path: Path) -> None:
        from pipeline.modalities.points.export import export_onnx

        export_onnx(linear_layer(weight, bias), prep, path)

    return {"baseline_majority": majority(split_labels(data, "train"), test.labels(), val[1],
                                          classes),
            "baseline_logreg": scored(
                model, f"{LOGREG_SETUP} on the standardised points",
                streamed(model, test, prep.normalize, classes),
                val, classes, macs=weight.size,
                params=weight.size + bias.size, export=export)}
