"""The audio modality's infra part (pipeline/core/modality.py Infra): the package stage posts every
test clip as its file to /classify_audio (the service decodes it as training did) and sends the
decoded waveforms to gRPC ModelInfer as FP32."""
from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from open_inference.grpc import protocol as pb

from pipeline import StageError
from pipeline.modalities.audio.serving import GRPC_INPUT


def served(client: httpx.Client, files: list[bytes], rows: list[dict], items: np.ndarray,
           max_batch: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Every test clip sent posted as its file to /classify_audio: endpoint -> (indices of the
    clips, answers). Raises StageError naming the clip's source the endpoint did not answer 200
    for."""
    answers = []
    for row, data in zip(rows, files):
        response = client.post("/classify_audio", files={"audio": (Path(row["id"]).name, data)})
        if response.status_code != 200:
            raise StageError(f"/classify_audio answered {response.status_code} for "
                             f"{row['source']}: {response.text[:300]}")
        answers.append(response.json())
    return {"/classify_audio": (np.arange(len(rows)), answers)}


def infer_request(model: str, version: str, items: np.ndarray) -> pb.ModelInferRequest:
    """A client's ModelInfer request for float32 waveforms (N, clip_samples), sent as raw
    little-endian bytes (package's infra validation and bench/serve_bench.py use it)."""
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[{"name": GRPC_INPUT, "datatype": "FP32", "shape": list(items.shape)}],
        outputs=[{"name": "probabilities"}],
        raw_input_contents=[np.ascontiguousarray(items, "<f4").tobytes()])
