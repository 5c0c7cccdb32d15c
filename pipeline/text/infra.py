"""The package stage's text path: a text model's answers over the text endpoints
(pipeline/service.py) for infra validation (the test split is read by pipeline/text/encoded.py). The image path
is in pipeline/package.py; this module holds only what differs for text."""
from __future__ import annotations

import httpx
import numpy as np

from pipeline import StageError


def served(client: httpx.Client, texts: list[str],
           max_batch: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Every text through /classify_text_batch, max_batch per request, and one by one through
    /classify_text (~1-3 ms each: the image path posts every test image too): endpoint ->
    (indices of the texts sent, the answers in order). Raises StageError naming an endpoint that
    did not answer 200."""
    batched = []
    for start in range(0, len(texts), max_batch):
        response = client.post("/classify_text_batch", json={"texts": texts[start:start + max_batch]})
        _check(response, "/classify_text_batch", start)
        batched.extend(response.json())
    single = []
    for i, text in enumerate(texts):
        response = client.post("/classify_text", json={"text": text})
        _check(response, "/classify_text", i)
        single.append(response.json())
    everything = np.arange(len(texts))
    return {"/classify_text_batch": (everything, batched), "/classify_text": (everything, single)}


def _check(response: httpx.Response, endpoint: str, index: int) -> None:
    if response.status_code != 200:
        raise StageError(f"{endpoint} answered {response.status_code} for test text {index}: "
                         f"{response.text[:300]}")
