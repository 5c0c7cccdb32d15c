"""Kiln's BentoML service: the selected model behind two HTTP endpoints.

    POST /classify        multipart file "image" (PNG/JPEG)  -> {"label", "index", "probabilities"}
    POST /classify_batch  JSON {"images": pixel array}       -> one such dict per image
    POST /classify_npy    multipart file "array": a .npy file (numpy.save) of pixels, the same
                          shapes as /classify_batch, uint8 or float -> one dict per image
    GET  /readyz          200 once the model is loaded and answered a self-check (BentoML calls
                          Classifier.__is_ready__); /livez, /metrics (Prometheus) come with BentoML

The model comes from the BentoML model store (written by `python -m pipeline package`) as
model.onnx + model.json; preprocessing is rebuilt from model.json, never re-implemented here.
Imports only bentoml, numpy, PIL, onnxruntime and pipeline.preprocess, so the Bento needs no torch.
Bad input gets HTTP 400 with a message, never 500; a request body larger than the model card's
serving.max_request_bytes (params.yaml serve.max_request_bytes, written by the package stage)
gets HTTP 413 before it is read.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, Callable

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


class RequestSizeLimit:
    """ASGI middleware: a request body over `max_bytes()` bytes gets HTTP 413 before it reaches
    the API (BentoML 1.4 has no body-size setting). A declared Content-Length is checked up
    front; a chunked body is buffered up to the limit, then replayed."""

    def __init__(self, app, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limit: int | None = None  # resolved on the first request: the model loads lazily

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.limit is None:
            self.limit = self.max_bytes()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reject(send, 400, "Content-Length is not a number")
            if int(length) > self.limit:
                return await _reject(send, 413, f"request body of {int(length)} bytes is over "
                                     f"the limit of {self.limit} bytes")
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _reject(send, 413, f"request body is over the limit of "
                                     f"{self.limit} bytes")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        return await self.app(scope, replayed, send)


async def _reject(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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
        if not isinstance(card.get("serving", {}).get("max_request_bytes"), int):
            raise RuntimeError("model.json: serving.max_request_bytes missing or not an integer "
                               "(written by `python -m pipeline package` from params.yaml serve)")
        self.preprocessing = Preprocessing.from_dict(card["preprocessing"])
        p = self.preprocessing
        self.input_shape = (p.channels, p.image_size, p.image_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = ORT_THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.model.path_of("model.onnx"), options, providers=["CPUExecutionProvider"])
        # Self-check before /readyz says yes: one blank image must give one logit per class, so
        # a model that does not match its card never gets traffic (and the first request does
        # not pay ONNX Runtime's warm-up).
        logits = self.session.run(["logits"], {"input": self.preprocessing.normalize(
            np.zeros((1, *self.input_shape), np.uint8))})[0]
        if logits.shape != (1, len(self.classes)):
            raise RuntimeError(f"model.onnx gives logits of shape {logits.shape} for one image; "
                               f"model.json lists {len(self.classes)} classes")
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

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

    @bentoml.api
    def classify_npy(self, array: Path) -> list[Prediction]:
        """Classify a binary pixel array: a .npy file (numpy.save, no pickles) uploaded as the
        multipart field "array", shapes and values as for /classify_batch."""
        try:
            images = np.load(io.BytesIO(array.read_bytes()), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # not .npy, truncated, or object arrays
            raise InvalidArgument(f"array: not a readable .npy file ({e})") from e
        try:
            pixels = _pixel_batch(images)
        except ValueError as e:
            raise InvalidArgument(str(e).replace("images:", "array:", 1)) from e
        return self._predict(pixels)


def _max_request_bytes() -> int:
    """serving.max_request_bytes from the served model's card."""
    card = json.loads(Path(Classifier.inner.model.resolve().path_of("model.json")).read_text())
    return int(card["serving"]["max_request_bytes"])


Classifier.add_asgi_middleware(RequestSizeLimit, max_bytes=_max_request_bytes)
