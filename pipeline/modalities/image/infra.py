"""The image modality's infra part (pipeline/core/modality.py Infra): the package stage posts every
test image as its file to /classify and all of them as .npy files to /classify_npy, and sends
raw pixels to gRPC ModelInfer."""
from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
from open_inference.grpc import protocol as pb

from pipeline import StageError
from pipeline.modalities.image.serving import DATATYPES, GRPC_INPUT



def served(client: httpx.Client, files: list[bytes], rows: list[dict], items: np.ndarray,
           max_batch: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Every test image sent (its file, its row, its uint8 pixels) posted as its file to /classify,
    and all as .npy files of up to max_batch images to /classify_npy: endpoint -> (indices of
    the images, answers). Raises StageError naming an endpoint that did not answer 200."""
    single = []
    for row, data in zip(rows, files):
        response = client.post("/classify", files={"image": (Path(row["id"]).name, data)})
        if response.status_code != 200:
            raise StageError(f"/classify answered {response.status_code} "
                             f"for {row['source']}: {response.text[:300]}")
        single.append(response.json())
    batched = []
    for start in range(0, len(items), max_batch):
        buffer = io.BytesIO()
        np.save(buffer, items[start:start + max_batch])
        response = client.post("/classify_npy", files={"array": ("test.npy", buffer.getvalue())})
        if response.status_code != 200:
            raise StageError(f"/classify_npy answered {response.status_code}: "
                             f"{response.text[:300]}")
        batched.extend(response.json())
    everything = np.arange(len(rows))
    return {"/classify": (everything, single), "/classify_npy": (everything, batched)}


def infer_request(model: str, version: str, items: np.ndarray) -> pb.ModelInferRequest:
    """A client's ModelInfer request for uint8 or float32 pixels (N, C, S, S), sent as raw
    little-endian bytes (package's infra validation and bench/serve_bench.py use it)."""
    datatype = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[items.dtype]
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[{"name": GRPC_INPUT, "datatype": datatype, "shape": list(items.shape)}],
        outputs=[{"name": "probabilities"}],
        raw_input_contents=[items.astype(DATATYPES[datatype][0], copy=False).tobytes()])
