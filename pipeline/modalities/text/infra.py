"""The text modality's infra part (pipeline/core/modality.py Infra): the package stage sends every
test text one by one to /classify_text, in batches to /classify_text_batch, and as BYTES to
gRPC ModelInfer."""
from __future__ import annotations


import httpx
import numpy as np
from open_inference.grpc import protocol as pb

from pipeline import StageError
from pipeline.modalities.text.serving import GRPC_INPUT



def served(client: httpx.Client, files: list[bytes], rows: list[dict], items: list[str],
           max_batch: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Every text through /classify_text_batch, max_batch per request, and one by one through
    /classify_text (~1-3 ms each: the image path posts every test image too): endpoint ->
    (indices of the texts sent, the answers in order). Raises StageError naming an endpoint that
    did not answer 200."""
    batched = []
    for start in range(0, len(items), max_batch):
        response = client.post("/classify_text_batch", json={"texts": items[start:start + max_batch]})
        _check(response, "/classify_text_batch", start)
        batched.extend(response.json())
    single = []
    for i, text in enumerate(items):
        response = client.post("/classify_text", json={"text": text})
        _check(response, "/classify_text", i)
        single.append(response.json())
    everything = np.arange(len(items))
    return {"/classify_text_batch": (everything, batched), "/classify_text": (everything, single)}


def _check(response: httpx.Response, endpoint: str, index: int) -> None:
    if response.status_code != 200:
        raise StageError(f"{endpoint} answered {response.status_code} for test text {index}: "
                         f"{response.text[:300]}")


def infer_request(model: str, version: str, items: list[str]) -> pb.ModelInferRequest:
    """A client's ModelInfer request for texts: one BYTES tensor [N] in raw_input_contents
    (package's infra validation and bench/serve_bench.py use it)."""
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[{"name": GRPC_INPUT, "datatype": "BYTES", "shape": [len(items)]}],
        outputs=[{"name": "probabilities"}],
        raw_input_contents=[b"".join(len(b).to_bytes(4, "little") + b
                                     for b in (t.encode("utf-8") for t in items))])
