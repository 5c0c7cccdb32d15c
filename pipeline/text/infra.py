"""The package stage's text path: a text model's test split as the served model reads it, and
its answers over the text endpoints (pipeline/service.py) for infra validation. The image path
is in pipeline/package.py; this module holds only what differs for text."""
from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from pipeline import StageError
from pipeline.dataset import load_texts
from pipeline.text import tokens

SINGLE_TEXTS = 32  # test texts also sent one by one to /classify_text (evenly spaced): the
                   # single endpoint's own code path, at a bounded cost per package run


def test_split(model_dir: Path, prep: tokens.TextPreprocessing,
               data_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The test texts, their int64 input_ids (N, L) by the model's saved tokenizer (sha256
    checked) and their int64 labels."""
    texts, labels = load_texts(data_dir, "test")
    return texts, tokens.encode(tokens.load(model_dir, prep), texts, prep), labels


def served(client: httpx.Client, texts: list[str],
           max_batch: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Every text through /classify_text_batch, max_batch per request, and SINGLE_TEXTS of them
    through /classify_text: endpoint -> (indices of the texts sent, the answers in order).
    Raises StageError naming an endpoint that did not answer 200."""
    batched = []
    for start in range(0, len(texts), max_batch):
        response = client.post("/classify_text_batch", json={"texts": texts[start:start + max_batch]})
        _check(response, "/classify_text_batch", start)
        batched.extend(response.json())
    picked = np.unique(np.linspace(0, len(texts) - 1, min(SINGLE_TEXTS, len(texts))).astype(int))
    single = []
    for i in picked:
        response = client.post("/classify_text", json={"text": texts[i]})
        _check(response, "/classify_text", i)
        single.append(response.json())
    return {"/classify_text_batch": (np.arange(len(texts)), batched),
            "/classify_text": (picked, single)}


def _check(response: httpx.Response, endpoint: str, index: int) -> None:
    if response.status_code != 200:
        raise StageError(f"{endpoint} answered {response.status_code} for test text {index}: "
                         f"{response.text[:300]}")
