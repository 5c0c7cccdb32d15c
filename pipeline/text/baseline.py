"""The number a text practitioner checks first: TF-IDF features and a logistic regression
(scikit-learn, its defaults: word unigrams, l2-normalised TF-IDF, L2-regularised LR with C=1),
fitted on the train split and scored on the split the variants are scored on. Evaluate reports
it beside the variants (evaluation.json `baseline_tfidf_lr`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline

from pipeline.dataset import load_texts

SETUP = "TfidfVectorizer() + LogisticRegression(max_iter=1000), scikit-learn defaults"


def tfidf_lr(data: Path, texts: list[str], labels: np.ndarray) -> dict:
    """Accuracy and macro F1 on (texts, labels) of TF-IDF + LR fitted on data's train split."""
    train_texts, train_labels = load_texts(data, "train")
    # max_iter: lbfgs' default 100 stops short of convergence on a few thousand features.
    model = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=1000))
    predicted = model.fit(train_texts, train_labels).predict(texts)
    return {"accuracy": round(float(accuracy_score(labels, predicted)), 5),
            "macro_f1": round(float(f1_score(labels, predicted, average="macro")), 5),
            "setup": SETUP}
