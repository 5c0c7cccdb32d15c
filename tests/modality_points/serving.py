"""The toy modality's serving part: gRPC ModelInfer's "points" (FP32 [N, features]) checked
(shape, finite, |value| <= points.serve.max_abs) and standardised as training did. Light: numpy
only, as the Bento has no torch."""
from __future__ import annotations

import numpy as np

from pipeline.serving.oip import input_tensor, shape_of

SERVES = "a points model"
TAKES = f"this server serves {SERVES}; send points to gRPC ModelInfer (input \"points\", FP32)"
GRPC_INPUT = "points"


def model_input(folder, card):
    return card.preprocessing.normalize


def example(card) -> np.ndarray:
    return np.zeros((1, card.preprocessing.features), np.float32)


def api_fields(card, args) -> dict[str, dict]:
    return {}


def grpc_input(request, card, args) -> np.ndarray:
    features = card.preprocessing.features
    expected = f"[N, {features}] (N points of {features} numbers)"
    tensor, raw = input_tensor(request, GRPC_INPUT, SERVES, f" (FP32 {expected})")
    if tensor.datatype != "FP32":
        raise ValueError(f"{GRPC_INPUT}: datatype {tensor.datatype!r} not accepted; send FP32")
    if len(tensor.shape) != 2 or tensor.shape[1] != features or tensor.shape[0] < 1:
        raise ValueError(f"{GRPC_INPUT}: shape {shape_of(tensor)}; expected {expected}")
    if tensor.shape[0] > args.serve.max_batch_items:
        raise ValueError(f"{GRPC_INPUT}: {tensor.shape[0]} points; at most "
                         f"{args.serve.max_batch_items} per request")
    count = tensor.shape[0] * features
    values = np.frombuffer(raw, "<f4") if raw is not None else \
        np.array(tensor.contents.fp32_contents, np.float32)
    if len(values) != count:
        raise ValueError(f"{GRPC_INPUT}: shape {list(tensor.shape)} has {count} values; the "
                         f"request holds {len(values)}")
    if not np.isfinite(values).all() or np.abs(values).max() > args.limits.max_abs:
        raise ValueError(f"{GRPC_INPUT}: values must be finite and at most "
                         f"{args.limits.max_abs:g} in magnitude")
    return values.reshape(tensor.shape[0], features)


def grpc_metadata(card) -> tuple[str, list[str], list[list[int]]]:
    return GRPC_INPUT, ["FP32"], [[-1, card.preprocessing.features]]
