"""The text modality's scoring part (pipeline/modality.py Scoring), for evaluate and package.

A split of the ingested texts is encoded by the model folder's own tokenizer (tokenizer.json
beside the weights, pipeline/text/encoded.py) into int64 input_ids, padded to the split's
longest text (evaluate's latency batches are test texts at that length).

The baseline is the number a text practitioner checks first: TF-IDF features and a logistic
regression (scikit-learn, its defaults: word unigrams, l2-normalised TF-IDF, L2-regularised LR
with C=1), fitted on the train split and scored on the split the variants are scored on.
Evaluate reports it beside the variants (evaluation.json `baseline_tfidf_lr`).

The gate's absolute floor is text.min_accuracy (gate.min_accuracy is the images').
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline

from pipeline.dataset import load_texts
from pipeline.text.encoded import encoded_split

if TYPE_CHECKING:
    from pipeline.card import ModelCard
    from pipeline.params import Params

SETUP = "TfidfVectorizer() + LogisticRegression(max_iter=1000), scikit-learn defaults"


def split_input(data: Path, split: str, model_dir: Path, card: ModelCard
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(int64 input_ids (N, L), int64 labels (N,), the texts) of one split."""
    return encoded_split(data, split, model_dir, card.preprocessing)


def baselines(data: Path, items: list[str], labels: np.ndarray) -> dict[str, dict]:
    """TF-IDF + LR fitted on data's train split, scored on (items, labels)."""
    return {"baseline_tfidf_lr": tfidf_lr(data, items, labels)}


def tfidf_lr(data: Path, texts: list[str], labels: np.ndarray) -> dict:
    """Accuracy and macro F1 on (texts, labels) of TF-IDF + LR fitted on data's train split."""
    train_texts, train_labels = load_texts(data, "train")
    # max_iter: lbfgs' default 100 stops short of convergence on a few thousand features.
    model = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=1000))
    predicted = model.fit(train_texts, train_labels).predict(texts)
    return {"accuracy": round(float(accuracy_score(labels, predicted)), 5),
            "macro_f1": round(float(f1_score(labels, predicted, average="macro")), 5),
            "setup": SETUP}


def floor(params: Params) -> tuple[float, str]:
    return params.text.min_accuracy, "text.min_accuracy"
