"""Kiln's BentoML service: the model a Bento was built and infra-validated with, behind three
HTTP endpoints and gRPC.

    POST /classify        multipart file "image" (PNG/JPEG)  -> {"label", "index", "probabilities"}
    POST /classify_batch  JSON {"images": pixel array}       -> one such dict per image
    POST /classify_npy    multipart file "array": a .npy file (numpy.save) of pixels, the same
                          shapes as /classify_batch, uint8 or float -> one dict per image
    POST /classify_text   JSON {"text": "..."}                -> one such dict (text models)
    POST /classify_text_batch  JSON {"texts": ["...", ...]}   -> one dict per text
    gRPC                  the Open Inference Protocol v2 (KServe/Triton) on serve.grpc_port or
                          KILN_GRPC_PORT, same host as HTTP, same model and checks
                          (pipeline/oip.py)
    GET  /readyz          200 once the model is loaded and answered a self-check (BentoML calls
                          Classifier.__is_ready__); /livez, /metrics (Prometheus) come with BentoML

Which model: the Bento's build arguments (pipeline.card.BentoArgs, written by the package stage)
name it by full tag, so a Bento serves the model it was validated with wherever it runs: from
the project's store (`make serve`), `bentoml serve <bento>`, an exported Bento folder or a
container (BentoML then reads the model from the Bento's own models/ folder). The model is
model.onnx + its card (model.json); the card's sha256 of model.onnx is checked before anything
is served, and preprocessing is rebuilt from the card, never re-implemented here: an image
model's (pipeline/image/preprocess.py), or a text model's tokenizer.json, checked against the card's
sha256 and applied by pipeline/text/tokens.py. Every endpoint exists whatever the model reads;
one of the other modality answers 400 saying which endpoints the served model takes. The same
arguments carry params.yaml `serve` as it was at packaging: body, pixel and batch limits, worker
processes, batch threads and the access log.

Imports only bentoml, numpy, PIL, onnxruntime, pydantic, anyio, starlette, python-multipart (the
last three come with BentoML), grpcio, grpcio-reflection, open-inference-grpc, psutil (comes with
BentoML), tokenizers and pipeline.api_docs/card/http_guard/oip/params/preprocess/text.tokens,
so the Bento needs no torch.
Bad input gets a 4xx with a message naming the cause, never a 5xx, at a cost bounded by params
before anything large is allocated: a body over serve.max_request_bytes gets 413 before it is
read; a content type, multipart body or field an endpoint does not take gets 415/400 before
BentoML parses it (pipeline/http_guard.py); an image over serve.max_image_pixels gets 400 from its header,
before decoding; a batch over serve.max_batch_images gets 400 (a .npy from its header, before
its pixels are allocated); a text that is empty or whitespace only, over serve.max_text_bytes
UTF-8 bytes, or more than serve.max_batch_images texts, gets 400; a body that is not UTF-8 JSON
(or escapes an unpaired surrogate), 400 from pydantic's JSON parser. An upload whose first
bytes show it over either limit is refused while its body is still arriving (InputGuard's
checks), so it never costs its body. Each
rejected request is one WARNING line in the server log, without a traceback.
"""
from __future__ import annotations

import ctypes
import io
import os
import signal
import warnings
from pathlib import Path
from typing import Annotated

import anyio
import anyio.to_thread
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from pipeline.api_docs import OfflineDocsPage
from pipeline import oip
from pipeline.card import BentoArgs, onnx_predictor, read_card, softmax
from pipeline.http_guard import (InputGuard, RejectionLog, RequestSizeLimit, cancel_request_timers,
                                 log_rejections_once)
from pipeline.params import typed
from pipeline.image.preprocess import IMAGE_FORMATS
from pipeline.text import tokens
from pipeline.text.tokens import TextPreprocessing

ARGS: BentoArgs = typed(vars(bentoml.use_arguments()), BentoArgs, "Bento arguments")
MODEL = bentoml.models.BentoModel(ARGS.model_tag)
SERVE = ARGS.serve
GRPC_STOP_GRACE_S = 5.0  # s in-flight gRPC calls get to finish when the worker stops
# What a request of the other modality is told (after its field's name).
TAKES_IMAGES = ("this server serves an image model; send images to /classify, /classify_batch "
                "or /classify_npy")
TAKES_TEXT = ("this server serves a text model; send {\"text\": ...} to /classify_text or "
              "{\"texts\": [...]} to /classify_text_batch")
EXAMPLE_TEXT = "How are you today?"  # the API page's example: any non-empty text is valid


class Prediction(BaseModel):
    label: str
    index: int
    probabilities: dict[str, float]


def _pixel_batch(images: np.ndarray) -> np.ndarray:
    """Per-request check of /classify_batch and /classify_npy input, run before adaptive batching
    concatenates requests (a wrong shape there would fail every request in the batch):
    -> float32 (N, C, S, S).

    Raises ValueError, which BentoML answers with HTTP 400 and this message.
    """
    return pixel_batch(images, bentoml.get_current_service().input_shape)


def pixel_batch(images: np.ndarray, input_shape: tuple[int, int, int] | None) -> np.ndarray:
    """_pixel_batch for a model input of input_shape (C, S, S), None for a text model; gRPC's
    ModelInfer checks the same way (pipeline/oip.py)."""
    if input_shape is None:
        raise ValueError(f"images: {TAKES_TEXT}")
    c, s, _ = input_shape
    expected = f"(N, {s}, {s}) or (N, {c}, {s}, {s})" if c == 1 else f"(N, {c}, {s}, {s})"
    if images.dtype.kind not in "uif":
        raise ValueError(f"images: expected uint8 or float pixel values 0..255, got dtype {images.dtype}")
    sent = images.shape
    if images.ndim == 3 and c == 1:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != (c, s, s):
        raise ValueError(f"images: expected shape {expected}, got {sent}")
    if images.shape[0] == 0:
        raise ValueError(f"images: empty batch; expected shape {expected} with N >= 1")
    if images.shape[0] > SERVE.max_batch_images:
        raise ValueError(f"images: {images.shape[0]} images; at most {SERVE.max_batch_images} "
                         f"images per request")
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 255:
        raise ValueError("images: pixel values must be finite and within 0..255")
    return images.astype(np.float32, copy=False)


def _example_batch(schema: dict) -> None:
    """/classify_batch's example on the API page (/docs.json): one blank image at the served
    model's input size. BentoML builds the page's schema on each request, once the model has
    loaded; while `bentoml build` writes the Bento's copy, no model has, and it gets none."""
    try:
        input_shape = bentoml.get_current_service().input_shape
    except BentoMLException:  # "service isn't instantiated yet"
        return
    if input_shape is None:  # a text model: the image endpoints take no example
        return
    c, s, _ = input_shape
    schema["example"] = np.zeros((1, s, s) if c == 1 else (1, c, s, s), np.uint8).tolist()


def checked_text(text: str, name: str, max_text_bytes: int) -> str:
    """One text sent to a text model, checked before it is tokenized: a non-space character
    and at most max_text_bytes UTF-8 bytes. Raises ValueError naming `name`, which BentoML
    answers with HTTP 400. A text is valid Unicode here: pydantic's JSON parser refuses a body
    that is not UTF-8 or escapes an unpaired surrogate (HTTP 400), gRPC decodes strictly."""
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        raise ValueError(f"{name}: {size} UTF-8 bytes, over the limit of {max_text_bytes} bytes")
    if not text.strip():
        raise ValueError(f"{name}: {'empty' if not text else 'whitespace only'}; send a text "
                         "with at least one word")
    return text


def text_batch(texts: list[str], field: str, max_text_bytes: int, max_texts: int) -> list[str]:
    """1..max_texts texts, each checked_text (named field[i]); gRPC's ModelInfer checks the same
    way (pipeline/oip.py). Raises ValueError (HTTP 400)."""
    if not texts:
        raise ValueError(f"{field}: no texts; send at least one")
    if len(texts) > max_texts:
        raise ValueError(f"{field}: {len(texts)} texts; at most {max_texts} texts per request")
    return [checked_text(text, f"{field}[{i}]", max_text_bytes) for i, text in enumerate(texts)]


def _served_text_model(field: str) -> None:
    """Raise ValueError (HTTP 400) naming the image endpoints if the served model reads images."""
    if bentoml.get_current_service().tokenizer is None:
        raise ValueError(f"{field}: {TAKES_IMAGES}")


def _text(text: str) -> str:
    """/classify_text's check of its field "text"."""
    _served_text_model("text")
    return checked_text(text, "text", SERVE.max_text_bytes)


def _texts(texts: list[str]) -> list[str]:
    """/classify_text_batch's check of its field "texts"."""
    _served_text_model("texts")
    return text_batch(texts, "texts", SERVE.max_text_bytes, SERVE.max_batch_images)


def _example_text(schema: dict) -> None:
    """/classify_text's example on the API page, shown only while a text model is served (as
    _example_batch shows its example only for an image model)."""
    try:
        tokenizer = bentoml.get_current_service().tokenizer
    except BentoMLException:  # "service isn't instantiated yet"
        return
    if tokenizer is not None:
        schema["example"] = EXAMPLE_TEXT


def _example_texts(schema: dict) -> None:
    """/classify_text_batch's example: _example_text's, twice."""
    _example_text(schema)
    if "example" in schema:
        schema["example"] = [schema["example"], schema["example"].lower()]


def _image_header(upload) -> Image.Image:
    """Multipart upload -> a PIL image whose header has been read and whose size is within
    serve.max_image_pixels, not yet decoded (this validator runs on the event loop; classify
    decides where to decode). Raises ValueError, which BentoML answers with HTTP 400."""
    if bentoml.get_current_service().input_shape is None:
        raise ValueError(f"image: {TAKES_TEXT}")
    data = upload if isinstance(upload, bytes) else getattr(upload, "file", upload).read()
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        raise ValueError("image: not a PNG or JPEG file") from e
    # A header PIL recognises but cannot parse; DecompressionBombError only if
    # serve.max_image_pixels is set above PIL's own limit (2 x Image.MAX_IMAGE_PIXELS).
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image: cannot read the PNG/JPEG header ({e})") from e
    problem = _pixels_over_limit(image)
    if problem:
        image.close()
        raise ValueError(problem)
    return image


def _pixels_over_limit(image: Image.Image) -> str | None:
    width, height = image.size
    if width * height > SERVE.max_image_pixels:
        return (f"image: {width}x{height} = {width * height} pixels, over the limit of "
                f"{SERVE.max_image_pixels} pixels")
    return None


def _image_too_large(head: bytes) -> str | None:
    """InputGuard's check of an upload's first bytes: why an image whose header shows it over
    serve.max_image_pixels is refused, or None (anything else is left to _image_header)."""
    try:
        with Image.open(io.BytesIO(head), formats=IMAGE_FORMATS) as image:
            return _pixels_over_limit(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _decoded(image: Image.Image) -> Image.Image:
    """Decode now, so a truncated file fails here (HTTP 400) and not in preprocessing."""
    try:
        image.load()
    # PIL reports a damaged file as OSError ("image file is truncated"), SyntaxError (broken
    # PNG chunks) or ValueError.
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidArgument(f"image: cannot decode the PNG/JPEG file ({e})") from e
    return image


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """A .npy file's (first) bytes -> (shape, fortran_order, dtype, offset of the values), the
    dtype checked to be numeric. Raises InvalidArgument (400)."""
    if data[:4] == b"PK\x03\x04":
        raise InvalidArgument("array: a .npz archive; expected one .npy file (numpy.save)")
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        read_header = {(1, 0): npy_format.read_array_header_1_0,
                       (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version} is not supported (1.0, 2.0 are)")
        shape, fortran_order, dtype = read_header(f)
    except (ValueError, OSError, EOFError, SyntaxError) as e:  # not .npy, or a damaged header
        raise InvalidArgument(f"array: not a readable .npy file ({e})") from e
    if dtype.hasobject or dtype.kind not in "uif":
        raise InvalidArgument(f"array: expected uint8 or float pixel values 0..255, got dtype {dtype}")
    return shape, fortran_order, dtype, f.tell()


def _npy_values_over_limit(shape: tuple[int, ...]) -> str | None:
    input_shape = bentoml.get_current_service().input_shape
    if input_shape is None:
        return f"array: {TAKES_TEXT}"
    c, s, _ = input_shape
    count = _values(shape)
    if count > SERVE.max_batch_images * c * s * s:
        return (f"array: shape {shape} holds {count} values; at most "
                f"{SERVE.max_batch_images} images per request")
    return None


def _values(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=object))  # Python ints: a hostile shape cannot overflow


def _npy_pixels(data: bytes) -> np.ndarray:
    """A .npy file's bytes -> its array, without copying, after its header has been checked: a
    numeric dtype and at most serve.max_batch_images images' worth of values, all present in the
    file; so a header claiming billions of values is refused before anything is allocated.
    Raises InvalidArgument (400)."""
    shape, fortran_order, dtype, offset = _npy_header(data)
    problem = _npy_values_over_limit(shape)
    if problem:
        raise InvalidArgument(problem)
    count = _values(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise InvalidArgument(f"array: not a readable .npy file (header says {count} values of "
                              f"{dtype.itemsize} bytes; the file holds {len(data) - offset} bytes)")
    array = np.frombuffer(data, dtype, count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _npy_too_large(head: bytes) -> str | None:
    """InputGuard's check of an upload's first bytes: why a .npy whose header shows it over
    serve.max_batch_images is refused, or None (anything else is left to _npy_pixels)."""
    try:
        shape = _npy_header(head)[0]
    except InvalidArgument:
        return None
    return _npy_values_over_limit(shape)


def _return_large_allocations_to_the_os() -> None:
    """glibc malloc keeps freed memory for reuse: with a valid 2 MB .npy batch in every 100
    requests (32 clients, bench/serve_bombs.py's mix otherwise) a worker kept +43 MB with this
    and +70 MB without (docs/benchmarks.md). Blocks of 1 MiB or more are mapped and
    unmapped on their own (a fixed threshold: glibc otherwise raises it after each free), and
    threads share 2 arenas. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, bytes
        libc.mallopt(-8, 2)        # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


_return_large_allocations_to_the_os()
log_rejections_once()
cancel_request_timers()
# PIL warns (two lines on stderr) when a header says over 89 Mpx; _image_header refuses such an
# image itself, logged as one line.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


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
        # A text model: its tokenizer (sha256 checked against the card), no image input shape.
        if isinstance(p, TextPreprocessing):
            self.tokenizer, self.input_shape = tokens.load(folder, p), None
        else:
            self.tokenizer, self.input_shape = None, (p.channels, p.image_size, p.image_size)
        # One image or text: a single-threaded session run inline (waking threads costs more
        # than the model); batches: serve.batch_threads threads.
        self.single = onnx_predictor(folder / weights, 1)
        self.batch = onnx_predictor(folder / weights, SERVE.batch_threads)
        # Self-check before /readyz says yes: one blank image (or one text) must give one logit
        # per class, so a model that does not match its card never gets traffic (and the first
        # request does not pay ONNX Runtime's warm-up).
        one = [EXAMPLE_TEXT] if self.tokenizer else np.zeros((1, *self.input_shape), np.uint8)
        for predict in (self.single, self.batch):
            logits = predict(self._model_input(one))
            if logits.shape != (1, len(self.classes)):
                raise RuntimeError(f"model.onnx gives logits of shape {logits.shape} for one "
                                   f"input; model.json lists {len(self.classes)} classes")
        self.decode_slot: anyio.CapacityLimiter | None = None
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """The Open Inference Protocol over gRPC in this worker, on this worker's event loop and
        this instance's sessions; every worker binds the same port (SO_REUSEPORT), on the host
        the HTTP socket is bound to. A port in use fails the worker's startup, naming it."""
        name, version = ARGS.model_tag.split(":")
        model = oip.ServedModel(
            name=name, version=version, server_version=bentoml.server_context.bento_version,
            classes=self.classes, input_shape=self.input_shape, ready=self.__is_ready__,
            pixels=lambda images: pixel_batch(images, self.input_shape),
            texts=lambda texts: text_batch(texts, oip.TEXT_INPUT, SERVE.max_text_bytes,
                                           SERVE.max_batch_images),
            probabilities=self._grpc_probabilities)
        try:
            self.grpc = await oip.start(model, oip.http_host(), oip.grpc_port(SERVE.grpc_port),
                                        max_message_bytes=SERVE.max_request_bytes)
        except oip.CannotListen:
            # BentoML's arbiter (this worker's parent) restarts a worker whose startup failed,
            # forever, while HTTP keeps accepting connections; a port in use does not free
            # itself, nor does a bad KILN_GRPC_PORT: stop the whole server, with the reason as
            # its last words.
            os.kill(os.getppid(), signal.SIGTERM)
            raise

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop(GRPC_STOP_GRACE_S)

    def _model_input(self, batch) -> np.ndarray:
        """Checked images (uint8 or [0, 255] float (N, C, S, S)) or texts (a list of N) -> the
        model's input, by the card's preprocessing."""
        if self.tokenizer is not None:
            return tokens.encode(self.tokenizer, batch, self.preprocessing)
        return self.preprocessing.normalize(batch)

    def _probabilities(self, batch, predict) -> np.ndarray:
        """Checked images or texts (_model_input) -> float64 softmax (N, classes)."""
        return softmax(predict(self._model_input(batch)))

    async def _grpc_probabilities(self, batch) -> np.ndarray:
        """gRPC's _probabilities: one image or text inline on the event loop, as /classify and
        /classify_text run it; a batch on the batch session in a thread, as the batch
        endpoints run it."""
        if len(batch) == 1:
            return self._probabilities(batch, self.single)
        return await anyio.to_thread.run_sync(self._probabilities, batch, self.batch)

    def _predict(self, batch, predict) -> list[Prediction]:
        """Checked images or texts (_model_input) -> one Prediction each."""
        probabilities = self._probabilities(batch, predict)
        return [
            Prediction(label=self.classes[int(i)], index=int(i),
                       probabilities=dict(zip(self.classes, map(float, row))))
            for i, row in zip(probabilities.argmax(axis=1), probabilities)
        ]

    def _classify_image(self, image: Image.Image) -> Prediction:
        with _decoded(image) as decoded:
            return self._predict(self.preprocessing.pixels(decoded)[None], self.single)[0]

    @bentoml.api
    async def classify(self, image: Annotated[
            Image.Image, BeforeValidator(_image_header),
            Field(description="the image to classify: a PNG or JPEG file, any size and colour "
                              "mode")]) -> Prediction:
        """Classify one uploaded PNG/JPEG image (multipart field "image").

        An image of up to serve.inline_decode_pixels is decoded and classified on the event
        loop (cheaper than the hop to a thread); a larger one, up to serve.max_image_pixels, in
        a worker thread, one at a time per worker, so it never holds the loop and a worker
        holds at most one large decoded image."""
        if image.width * image.height <= SERVE.inline_decode_pixels:
            return self._classify_image(image)
        if self.decode_slot is None:  # created on the event loop, as anyio requires
            self.decode_slot = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._classify_image, image, limiter=self.decode_slot)

    @bentoml.api(batchable=True, max_batch_size=SERVE.max_batch_images, max_latency_ms=5000)
    def classify_batch(self, images: Annotated[
            np.ndarray, AfterValidator(_pixel_batch),
            Field(description="pixel values 0..255, shape (N, S, S) or (N, C, S, S) at the "
                              "model's input size S (the example: one blank image)",
                  json_schema_extra=_example_batch)]) -> list[Prediction]:
        """Classify pixel arrays, values 0..255, shape (N, S, S) (grayscale models) or
        (N, C, S, S) at the model's input size, N <= serve.max_batch_images. Requests are
        batched together adaptively."""
        return self._predict(images, self.batch)

    @bentoml.api
    def classify_npy(self, array: Annotated[Path, Field(
            description="a .npy file (numpy.save) of pixel values 0..255, uint8 or float, "
                        "shaped as /classify_batch's images")]) -> list[Prediction]:
        """Classify a binary pixel array: a .npy file (numpy.save, no pickles) uploaded as the
        multipart field "array", shapes and values as for /classify_batch."""
        if self.input_shape is None:
            raise InvalidArgument(f"array: {TAKES_TEXT}")
        images = _npy_pixels(array.read_bytes())
        try:
            pixels = _pixel_batch(images)
        except ValueError as e:
            raise InvalidArgument(str(e).replace("images:", "array:", 1)) from e
        return self._predict(pixels, self.batch)

    @bentoml.api
    async def classify_text(self, text: Annotated[
            str, AfterValidator(_text),
            Field(description="the text to classify (text models): any UTF-8 text with a "
                              "non-space character, at most serve.max_text_bytes bytes; the "
                              "model reads its first text.max_tokens tokens",
                  json_schema_extra=_example_text)]) -> Prediction:
        """Classify one text (JSON {"text": "..."}), tokenized by the model's saved tokenizer
        and classified on the event loop: ~17 us to tokenize and ~0.1 ms through an encoder of
        params.yaml text's size (docs/benchmarks.md, Text serving), about what a hop to a
        thread costs."""
        return self._predict([text], self.single)[0]

    @bentoml.api
    def classify_text_batch(self, texts: Annotated[
            list[str], AfterValidator(_texts),
            Field(description="texts to classify (text models): 1 to serve.max_batch_images "
                              "of them, each as /classify_text's text",
                  json_schema_extra=_example_texts)]) -> list[Prediction]:
        """Classify several texts (JSON {"texts": ["...", ...]}) in one model call, padded to
        the longest of them; one answer per text, in order."""
        return self._predict(texts, self.batch)


# First added is outermost: every rejection below is logged; the body is bounded before the
# guard reads it.
Classifier.add_asgi_middleware(RejectionLog)
Classifier.add_asgi_middleware(RequestSizeLimit, max_bytes=SERVE.max_request_bytes)
Classifier.add_asgi_middleware(InputGuard, routes={
    api.route: tuple(api.input_spec.multipart_fields) for api in Classifier.apis.values()},
    checks={("/classify", "image"): _image_too_large, ("/classify_npy", "array"): _npy_too_large})
Classifier.add_asgi_middleware(OfflineDocsPage)  # GET /: Swagger UI with nothing from outside
