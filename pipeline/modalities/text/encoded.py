"""A split of the ingested texts as model input: decoded (pipeline.core.dataset.load_texts) and
encoded by the tokenizer saved in a folder (data/augmented or a model folder), the way train
scores its val split and evaluate its test split. numpy only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.dataset import load_texts
from pipeline.modalities.text import preprocess as tokens
from pipeline.modalities.text.preprocess import TextPreprocessing


def encoded_split(data: Path, split: str, tokenizer_folder: Path,
                  prep: TextPreprocessing) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(int64 input_ids (N, L), int64 labels (N,), the texts) of one split."""
    texts, labels = load_texts(data, split)
    return tokens.encode(tokens.load(tokenizer_folder, prep), texts, prep), labels, texts
