"""The baselines evaluate's gate measures every variant against: simple models fitted on the train
split and scored on the split the variants are scored on. Each modality's scoring part says
which it has (pipeline/modalities/<modality>/scoring.py baselines, pipeline/core/modality.py Scoring).

    baseline_majority  every item gets the train split's most frequent class (scikit-learn's
                       DummyClassifier): what a model that learnt nothing scores
    baseline_logreg    multinomial logistic regression (scikit-learn's LogisticRegression: L2,
                       C=1, lbfgs) on fixed features of the model's own input (an image's
                       normalised pixels; a clip's log-mel band means and deviations)
    baseline_tfidf_lr  texts: TF-IDF word unigrams and the same logistic regression

A learned baseline is fitted on at most evaluate.baseline_train_items train items, drawn with
data.seed. A variant must reach the best baseline's accuracy plus gate.baseline_margin; a
baseline that can be served (`export`: one ONNX graph of the input its serving part builds and a
`logits` output) and is more accurate than every variant is a candidate of the gate itself.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss

from pipeline.core.card import PREDICT_BATCH
from pipeline.core.dataset import Items, sample, split_of

# lbfgs' default 100 iterations stop short of convergence on a few thousand features
LOGREG = {"max_iter": 1000}
LOGREG_SETUP = "LogisticRegression(max_iter=1000), scikit-learn defaults"


@dataclass(frozen=True)
class Baseline:
    setup: str           # what it is, in words
    accuracy: float      # on the scored split
    macro_f1: float
    val_loss: float      # on the val split: the card of a served baseline records them
    val_accuracy: float
    macs: int            # multiply-accumulates per item of its served graph (0: not servable)
    params: int          # its weights
    export: Callable[[Path], None] | None  # writes its ONNX graph; None: not servable
    why_not_servable: str | None = None

    def report(self) -> dict:
        """What evaluate's --metrics and --details say about it."""
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "setup": self.setup,
                "servable": self.export is not None,
                **({"why_not_servable": self.why_not_servable} if self.why_not_servable else {})}


def train_sample(folder: Path, prep, limit: int, seed: int, features: Callable
                 ) -> tuple[np.ndarray, np.ndarray]:
    """features(items) of a sample (pipeline/core/dataset.py sample: at most `limit`, drawn with
    `seed`) of the ingested train split, and their int64 labels: only the chosen items decoded,
    through `prep`'s load, a batch (PREDICT_BATCH) at a time; only their features held."""
    train = split_of(folder, "train", prep)
    chosen = sample(len(train), limit, seed)
    return (np.concatenate([features(items) for items in train.taken(chosen, PREDICT_BATCH)]),
            train.labels()[chosen])


def probabilities(model, features, classes: int) -> np.ndarray:
    """A fitted scikit-learn classifier's predict_proba over every class index (0 for a class
    the train split lacks)."""
    out = np.zeros((len(features), classes))
    out[:, model.classes_] = model.predict_proba(features)
    return out / out.sum(1, keepdims=True)  # float32 features: sums a hair off 1


def streamed(model, test: Items, features: Callable, classes: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, classes), labels) of a fitted classifier on the split `test`, its
    features computed a batch of items at a time (PREDICT_BATCH)."""
    return (test.batch_outputs(PREDICT_BATCH,
                               lambda items: probabilities(model, features(items), classes)),
            test.labels())


def scored(model, setup: str, test: tuple, val: tuple, classes: int, macs: int,
           params: int, export: Callable[[Path], None] | None,
           why_not_servable: str | None = None) -> Baseline:
    """A fitted scikit-learn classifier's Baseline on `test` and `val` ((probabilities, labels)
    of the scored split and of the val split: `streamed`)."""
    predicted = test[0].argmax(1)
    val_probabilities = val[0]
    return Baseline(setup=setup,
                    accuracy=round(float(accuracy_score(test[1], predicted)), 5),
                    macro_f1=round(float(f1_score(test[1], predicted, average="macro")), 5),
                    val_loss=float(log_loss(val[1], val_probabilities, labels=range(classes))),
                    val_accuracy=float(accuracy_score(val[1], val_probabilities.argmax(1))),
                    macs=macs, params=params, export=export, why_not_servable=why_not_servable)


def majority(train_labels: np.ndarray, test: np.ndarray, val: np.ndarray,
             classes: int) -> Baseline:
    """Every item gets the train split's most frequent class; `test`, `val`: the labels of the
    scored and the val split (nothing is decoded). Not served: it reads nothing."""
    model = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(train_labels), 1)),
                                                          train_labels)
    return scored(model, "DummyClassifier(strategy='most_frequent')",
                  (probabilities(model, np.zeros((len(test), 1)), classes), test),
                  (probabilities(model, np.zeros((len(val), 1)), classes), val),
                  classes, macs=0, params=0, export=None,
                  why_not_servable="it answers one class whatever it is sent")


def logistic_regression(features: np.ndarray, labels: np.ndarray) -> LogisticRegression:
    """LogisticRegression (LOGREG) fitted on float features (N, F)."""
    return LogisticRegression(**LOGREG).fit(features, labels)


def linear_layer(weight: np.ndarray, bias: np.ndarray):
    """A torch nn.Linear holding `weight` (classes, F) and `bias` (classes,) as float32: a
    fitted linear baseline as a layer of the graph its modality exports."""
    import torch
    from torch import nn

    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
        linear.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return linear


def linear_logits(model: LogisticRegression, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (classes, F), bias (classes,)) whose softmax(weight @ x + bias) is the fitted
    model's predict_proba, over every class index: a binary model's one row is the second
    class's logit over a first class at 0, and a class the train split lacks gets -1e9."""
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros_like(intercept), intercept])
    weight = np.zeros((classes, coef.shape[1]), np.float32)
    bias = np.full(classes, -1e9, np.float32)
    weight[model.classes_], bias[model.classes_] = coef, intercept
    return weight, bias
