"""The toy modality's infra part: points have no REST endpoint of their own (the service's
endpoints are the built-in modalities'); infra validation sends them through gRPC ModelInfer."""
from __future__ import annotations

import numpy as np
from open_inference.grpc import protocol as pb

from pipeline.modalities.points.serving import GRPC_INPUT


def served(client, files, rows, items, max_batch) -> dict:
    return {}


def infer_request(model: str, version: str, items: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[{"name": GRPC_INPUT, "datatype": "FP32", "shape": list(items.shape)}],
        outputs=[{"name": "probabilities"}],
        raw_input_contents=[np.ascontiguousarray(items, "<f4").tobytes()])
