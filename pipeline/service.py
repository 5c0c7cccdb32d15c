"""Kiln's BentoML service: the model a Bento was built and infra-validated with, behind three
HTTP endpoints.

    POST /classify        multipart file "image" (PNG/JPEG)  -> {"label", "index", "probabilities"}
    POST /classify_batch  JSON {"images": pixel array}       -> one such dict per image
    POST /classify_npy    multipart file "array": a .npy file (numpy.save) of pixels, the same
                          shapes as /classify_batch, uint8 or float -> one dict per image
    GET  /readyz          200 once the model is loaded and answered a self-check (BentoML calls
                          Classifier.__is_ready__); /livez, /metrics (Prometheus) come with BentoML

Which model: the Bento's build arguments (pipeline.card.BentoArgs, written by the package stage)
name it by full tag, so a Bento serves the model it was validated with wherever it runs: from
the project's store (`make serve`), `bentoml serve <bento>`, an exported Bento folder or a
container (BentoML then reads the model from the Bento's own models/ folder). The model is
model.onnx + its card (model.json); the card's sha256 of model.onnx is checked before anything
is served, and preprocessing is rebuilt from the card, never re-implemented here. The same
arguments carry params.yaml `serve` as it was at packaging: body limit, worker processes, batch
threads and the access log.

Imports only bentoml, numpy, PIL, onnxruntime, pydantic and pipeline.card/params/preprocess, so
the Bento needs no torch. Bad input gets HTTP 400 with a message, never 500; a request body
larger than serve.max_request_bytes gets HTTP 413 before it is read.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, BeforeValidator

from pipeline.api_docs import OfflineDocsPage
from pipeline.card import BentoArgs, onnx_predictor, read_card
from pipeline.params import typed
from pipeline.preprocess import IMAGE_FORMATS

ARGS: BentoArgs = typed(vars(bentoml.use_arguments()), BentoArgs, "Bento arguments")
MODEL = bentoml.models.BentoModel(ARGS.model_tag)
SERVE = ARGS.serve


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


def _decoded_image(upload) -> Image.Image:
    """Multipart upload -> decoded PIL image, in memory (BentoML's Path input would write every
    upload to a temporary file). Raises ValueError, which BentoML answers with HTTP 400."""
    data = upload if isinstance(upload, bytes) else getattr(upload, "file", upload).read()
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as decoded:
            decoded.load()  # decode now, so a truncated file fails here and not later
            return decoded
    except UnidentifiedImageError as e:
        raise ValueError("image: not a PNG or JPEG file") from e
    # PIL reports a damaged file as OSError ("image file is truncated"), SyntaxError (broken
    # PNG chunks) or ValueError, and too many pixels as DecompressionBombError.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image: cannot decode the PNG/JPEG file ({e})") from e


class RequestSizeLimit:
    """ASGI middleware: a request body over `max_bytes` bytes gets HTTP 413 before it reaches
    the API (BentoML 1.4 has no body-size setting). A declared Content-Length is checked up
    front; a chunked body is buffered up to the limit, then replayed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.limit = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
    workers=SERVE.workers or "cpu_count",
    traffic={"timeout": 30},  # s per request
    logging={"access": {"enabled": SERVE.access_log}},
)
class Classifier:
    model = MODEL

    def __init__(self) -> None:
        folder = Path(self.model.path)
        card = read_card(folder)  # refuses a model.onnx whose sha256 is not the card's
        (weights,) = card.weights
        self.classes = card.classes
        self.preprocessing = p = card.preprocessing
        self.input_shape = (p.channels, p.image_size, p.image_size)
        # One image: a single-threaded session run inline (waking threads costs more than the
        # model); batches: serve.batch_threads threads.
        self.single = onnx_predictor(folder / weights, 1)
        self.batch = onnx_predictor(folder / weights, SERVE.batch_threads)
        # Self-check before /readyz says yes: one blank image must give one logit per class, so
        # a model that does not match its card never gets traffic (and the first request does
        # not pay ONNX Runtime's warm-up).
        blank = np.zeros((1, *self.input_shape), np.uint8)
        for predict in (self.single, self.batch):
            logits = predict(self.preprocessing.normalize(blank))
            if logits.shape != (1, len(self.classes)):
                raise RuntimeError(f"model.onnx gives logits of shape {logits.shape} for one "
                                   f"image; model.json lists {len(self.classes)} classes")
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def _predict(self, pixels: np.ndarray, predict) -> list[Prediction]:
        """uint8 or [0, 255] float (N, C, S, S) -> one Prediction per image."""
        logits = predict(self.preprocessing.normalize(pixels))
        logits = logits.astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        return [
            Prediction(label=self.classes[int(i)], index=int(i),
                       probabilities=dict(zip(self.classes, map(float, row))))
            for i, row in zip(probabilities.argmax(axis=1), probabilities)
        ]

    @bentoml.api
    async def classify(self, image: Annotated[Image.Image, BeforeValidator(_decoded_image)]
                       ) -> Prediction:
        """Classify one uploaded PNG/JPEG image (multipart field "image").

        async: it runs on the event loop, without a hop to the thread pool; one LeNet-5-sized
        image takes ~0.1 ms to decode and classify."""
        return self._predict(self.preprocessing.pixels(image)[None], self.single)[0]

    @bentoml.api(batchable=True, max_batch_size=256, max_latency_ms=5000)
    def classify_batch(self, images: Annotated[np.ndarray, AfterValidator(_pixel_batch)]
                       ) -> list[Prediction]:
        """Classify pixel arrays, values 0..255, shape (N, S, S) (grayscale models) or
        (N, C, S, S) at the model's input size. Requests are batched together adaptively."""
        return self._predict(images, self.batch)

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
        return self._predict(pixels, self.batch)


Classifier.add_asgi_middleware(RequestSizeLimit, max_bytes=SERVE.max_request_bytes)
Classifier.add_asgi_middleware(OfflineDocsPage)  # GET /: Swagger UI with nothing from outside
