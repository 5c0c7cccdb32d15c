"""Kiln's BentoML service: the selected model behind two HTTP endpoints.

    POST /classify        multipart file "image" (PNG/JPEG)  -> {"label", "index", "probabilities"}
    POST /classify_batch  JSON {"images": pixel array}       -> one such dict per image

The model comes from the BentoML model store (written by `python -m pipeline package`) as
model.onnx + model.json; preprocessing is rebuilt from model.json, never re-implemented here.
Imports only bentoml, numpy, PIL, onnxruntime and pipeline.preprocess, so the Bento needs no torch.
Bad input gets HTTP 400 with a message, never 500.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
import onnxruntime as ort
from bentoml.exceptions import InvalidArgument
from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel

from pipeline.preprocess import Preprocessing

MODEL_NAME = "kiln-classifier"  # model store name; package.py writes under it

# ONNX Runtime threads per worker: the models are tiny (LeNet-5 b256 ~1.4 ms on 2 threads), so
# more threads only add contention with the HTTP workers.
ORT_THREADS = 2
IMAGE_FORMATS = ["PNG", "JPEG"]


class Prediction(BaseModel):
    label: str
    index: int
    probabilities: dict[str, float]


def _pixel_batch(images: np.ndarray) -> np.ndarray:
    """Per-request check of /classify_batch input, run before adaptive batching concatenates
    requests (a wrong shape there would fail every request in the batch): -> float32 (N, C, S, S).

    Raises ValueError, which BentoML answers with HTTP 400 and this message.
    """
    c, s, _ = bentoml.get_current_service().input_shape
    expected = f"(N, {s}, {s}) or (N, {c}, {s}, {s})" if c == 1 else f"(N, {c}, {s}, {s})"
    if images.dtype.kind not in "uif":
        raise ValueError(f"images: expected uint8 or float pixel values 0..255, got dtype {images.dtype}")
    if images.ndim == 3 and c == 1:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != (c, s, s):
        raise ValueError(f"images: expected shape {expected}, got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"images: empty batch; expected shape {expected} with N >= 1")
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 255:
        raise ValueError("images: pixel values must be finite and within 0..255")
    return images.astype(np.float32)


@bentoml.service(
    http={"host": "127.0.0.1"},  # loopback unless `bentoml serve --host` says otherwise
    workers=1,
    traffic={"timeout": 30},  # s per request
)
class Classifier:
    model = bentoml.models.BentoModel(f"{MODEL_NAME}:latest")

    def __init__(self) -> None:
        card = json.loads(Path(self.model.path_of("model.json")).read_text())
        self.classes: list[str] = card["classes"]
        self.preprocessing = Preprocessing.from_dict(card["preprocessing"])
        p = self.preprocessing
        self.input_shape = (p.channels, p.image_size, p.image_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = ORT_THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.model.path_of("model.onnx"), options, providers=["CPUExecutionProvider"])

    def _predict(self, pixels: np.ndarray) -> list[Prediction]:
        """uint8 or [0, 255] float (N, C, S, S) -> one Prediction per image."""
        logits = self.session.run(["logits"], {"input": self.preprocessing.normalize(pixels)})[0]
        logits = logits.astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        return [
            Prediction(label=self.classes[int(i)], index=int(i),
                       probabilities=dict(zip(self.classes, map(float, row))))
            for i, row in zip(probabilities.argmax(axis=1), probabilities)
        ]

    @bentoml.api
    def classify(self, image: Path) -> Prediction:
        """Classify one uploaded PNG/JPEG image (multipart field "image")."""
        try:
            with Image.open(image, formats=IMAGE_FORMATS) as decoded:
                decoded.load()  # decode now, so a truncated file fails here and not later
                pixels = self.preprocessing.pixels(decoded)
        except UnidentifiedImageError as e:  # its message would show the server's temp path
            raise InvalidArgument("image: not a PNG or JPEG file") from e
        # PIL reports a damaged file as OSError ("image file is truncated"), SyntaxError (broken
        # PNG chunks) or ValueError, and too many pixels as DecompressionBombError.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise InvalidArgument(f"image: cannot decode the PNG/JPEG file ({e})") from e
        return self._predict(pixels[None])[0]

    @bentoml.api(batchable=True, max_batch_size=256, max_latency_ms=5000)
    def classify_batch(self, images: Annotated[np.ndarray, AfterValidator(_pixel_batch)]
                       ) -> list[Prediction]:
        """Classify pixel arrays, values 0..255, shape (N, S, S) (grayscale models) or
        (N, C, S, S) at the model's input size. Requests are batched together adaptively."""
        return self._predict(images)
