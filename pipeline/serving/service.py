"""Kiln's BentoML service: the model a Bento was built and infra-validated with, behind six
HTTP endpoints and gRPC.

    POST /classify        multipart file "image" (PNG, JPEG, WebP, BMP, TIFF, GIF)
                          -> {"label", "index", "probabilities"}
    POST /classify_batch  JSON {"images": pixel array}       -> one such dict per image
    POST /classify_npy    multipart file "array": a .npy file (numpy.save) of pixels, the same
                          shapes as /classify_batch, uint8 or float -> one dict per image
    POST /classify_text   JSON {"text": "..."}                -> one such dict (text models)
    POST /classify_text_batch  JSON {"texts": ["...", ...]}   -> one dict per text
    POST /classify_audio  multipart file "audio" (WAV, FLAC, Ogg, MP3, M4A, AAC) -> one such dict
                          (audio models)
    gRPC                  the Open Inference Protocol v2 (KServe/Triton) on serve.grpc_port or
                          KILN_GRPC_PORT, same host as HTTP, same model and checks
                          (pipeline/serving/oip.py)
    GET  /readyz          200 once the model is loaded and answered a self-check (BentoML calls
                          Classifier.__is_ready__); /livez, /metrics (Prometheus) come with BentoML

Which model: the Bento's build arguments (pipeline.core.card.BentoArgs, written by the package stage)
name it by full tag, so a Bento serves the model it was validated with wherever it runs: from
the project's store (`make serve`), `bentoml serve <bento>`, an exported Bento folder or a
container (BentoML then reads the model from the Bento's own models/ folder). The model is
model.onnx + its card (model.json) and the files its preprocessing names beside it; the card's
sha256 of model.onnx is checked before anything is served. A model that cannot be served (a
sha256 that is not the card's, a card that does not parse, an ONNX file ONNX Runtime refuses, a
failed self-check) or a gRPC port in use stops the whole server: `bentoml serve` exits non-zero
with the reason in its log (pipeline/serving/cannot_serve.py), instead of restarting workers forever.

What the model reads is its modality's: the served model's serving part
(pipeline/modalities/<modality>/serving.py, pipeline/core/modality.py Serving) checks each endpoint's input and
turns a checked batch into the model's input by the card's preprocessing (an image model's
pipeline/modalities/image/preprocess.py, a text model's tokenizer.json checked against the card's sha256),
never re-implemented here. Every endpoint exists whatever the model reads (BentoML declares them
statically); one of another modality answers 400 saying which endpoints the served model takes,
and the API page (/docs.json, pipeline/serving/api_docs.py) lists the served model's only. The same
arguments carry params.yaml `serve` as it was at packaging: body, pixel and batch limits,
worker processes, batch threads, the access log, connection timeouts and the length of error
messages.

Imports only bentoml, numpy, PIL, onnxruntime, pydantic, anyio, starlette, python-multipart (the
last three come with BentoML), grpcio, grpcio-reflection, open-inference-grpc, psutil (comes with
BentoML), tokenizers, soundfile, soxr, av (M4A/AAC uploads only) and the project modules bentofile.yaml `include` lists
(every modality's serving part among them), so the Bento needs no torch.

Bad input gets a 4xx with a message naming the cause, never a 5xx, at a cost bounded by params
before anything large is allocated: a body over serve.max_request_bytes gets 413 before it is
read; a content type, multipart body or field an endpoint does not take gets 415/400 before
BentoML parses it (pipeline/serving/http_guard.py); an image over image.serve.max_image_pixels gets 400 from its header,
before decoding; a batch over serve.max_batch_items gets 400 (a .npy from its header, before
its pixels are allocated); a text with no visible character (empty, whitespace, control or
zero-width characters only), over text.serve.max_text_bytes UTF-8 bytes, or more than
serve.max_batch_items texts, gets 400; an audio file of another
format, empty, undecodable, silent or over audio.serve.max_seconds (from its header, before its
samples are decoded) gets 400; a body that is not UTF-8 JSON
(or escapes an unpaired surrogate), 400 from pydantic's JSON parser. An upload whose first
bytes show it over either limit is refused while its body is still arriving (InputGuard's
checks), so it never costs its body. An upload's file name is never used as a file's (uploads
stay in memory: _upload). Every error answer is {"error": message}, whoever gives it, the
message at most serve.max_error_chars characters with control characters escaped, and each
rejected request is one WARNING line in the server log, without a traceback
(pipeline/serving/http_guard.py ErrorAnswers, pipeline/serving/rejections.py). A connection idle for
serve.idle_timeout_s, or whose request head is still arriving serve.header_timeout_s after its
first byte, is closed (http_guard.TimedConnections).
"""
from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import Annotated

import anyio
import anyio.to_thread
import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from PIL import Image
from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, PlainValidator,
                      WithJsonSchema)

from pipeline import StageError
from pipeline.serving import oip
from pipeline.serving.api_docs import OfflineDocsPage, PublishedSpec
from pipeline.serving.cannot_serve import exit_worker, stop_server_when_a_worker_cannot_serve
from pipeline.core.card import BentoArgs, onnx_predictor, read_card, read_limits, softmax
from pipeline.serving.http_guard import (ErrorAnswers, InputGuard, RequestSizeLimit, cancel_request_timers,
                                 log_rejections_once, time_out_connections)
from pipeline.core.modality import card_part
from pipeline.params import typed

ARGS: BentoArgs = typed(vars(bentoml.use_arguments()), BentoArgs, "Bento arguments")
MODEL = bentoml.models.BentoModel(ARGS.model_tag)
SERVE = ARGS.serve
GRPC_STOP_GRACE_S = 5.0  # s in-flight gRPC calls get to finish when the worker stops


class Prediction(BaseModel):
    label: str
    index: int
    probabilities: dict[str, float]


# Each endpoint belongs to one modality, whose serving part (pipeline/modalities/<modality>/serving.py)
# checks its input and raises ValueError naming the cause: from a pydantic validator BentoML
# answers it with HTTP 400 and its message. On a model of another modality every endpoint
# answers 400 with that model's TAKES (which endpoints it does take). The validators run per
# request, before adaptive batching concatenates requests (a bad one there would fail the whole
# batch), and on the event loop.

def _refusal(modality: str, field: str) -> str | None:
    """Why `field` of a `modality` endpoint is refused by the served model: it serves another
    modality. None when it serves this one."""
    served = bentoml.get_current_service()
    return None if served.modality == modality else f"{field}: {served.serving.TAKES}"


def _served(modality: str, field: str):
    """The Classifier serving a model of `modality`, or ValueError (_refusal)."""
    if (refusal := _refusal(modality, field)) is not None:
        raise ValueError(refusal)
    return bentoml.get_current_service()


def _image(upload) -> Image.Image:
    """/classify's "image": its header read and its size checked, not yet decoded (classify
    decides where to decode)."""
    served = _served("image", "image")
    return served.serving.image(upload, served.card, served.args)


def _images(images: np.ndarray) -> object:
    served = _served("image", "images")
    return served.serving.images(images, served.card, served.args)


def _array(data: bytes) -> object:
    served = _served("image", "array")
    return served.serving.array(data, served.card, served.args)


def _text(text: str) -> str:
    served = _served("text", "text")
    return served.serving.text(text, served.card, served.args)


def _texts(texts: list[str]) -> object:
    served = _served("text", "texts")
    return served.serving.texts(texts, served.card, served.args)


def _upload(modality: str, field: str):
    """A PlainValidator for an upload field of a `modality` endpoint: the upload as it came (a
    Starlette UploadFile, in memory or spooled to an unnamed file), once the served model is
    known to take it. BentoML's own `Path` input writes every upload to a file named after the
    client's filename, which reached the filesystem: a 245-byte name got HTTP 500 (File name
    too long)."""
    def checked(upload):
        _served(modality, field)
        return upload
    return PlainValidator(checked)


def _upload_bytes(upload) -> bytes:
    return upload if isinstance(upload, bytes) else upload.file.read()


# What the schemas say of such a field (pydantic derives none through a PlainValidator): a file
# upload, as BentoML's own file input says it: "file" in /schema.json, which BentoML's clients
# read, and an OpenAPI 3.0 file part (a binary string) in /docs.json.
UPLOAD_SCHEMA = (WithJsonSchema({"type": "file", "format": "binary"}, mode="validation"),
                 WithJsonSchema({"type": "string", "format": "binary"}, mode="serialization"))


def _audio(upload) -> object:
    served = _served("audio", "audio")
    return served.serving.audio(upload, served.card, served.args)


def _image_head(head: bytes) -> str | None:
    """InputGuard's check of an upload's first bytes: why it is refused (a size over a limit
    its header shows, another modality's endpoint) or None."""
    served = bentoml.get_current_service()
    return _refusal("image", "image") or served.serving.image_head(head, served.card, served.args)


def _array_head(head: bytes) -> str | None:
    """_image_head's check for /classify_npy."""
    served = bentoml.get_current_service()
    return _refusal("image", "array") or served.serving.array_head(head, served.card, served.args)


def _audio_head(head: bytes) -> str | None:
    """_image_head's check for /classify_audio: a file whose first bytes hold more than
    audio.serve.max_seconds."""
    served = bentoml.get_current_service()
    return _refusal("audio", "audio") or served.serving.audio_head(head, served.card, served.args)


# Endpoint -> the modality whose model it serves: the API page (/docs.json) lists the served
# model's only (the others answer every request with 400 naming the ones it takes).
MODALITY_OF_ENDPOINT = {"/classify": "image", "/classify_batch": "image", "/classify_npy": "image",
                        "/classify_text": "text", "/classify_text_batch": "text",
                        "/classify_audio": "audio"}


def _published() -> tuple[set[str], dict[str, dict]]:
    """What the API page (/docs.json, pipeline/serving/api_docs.py) publishes of the served model: its
    endpoints, and the JSON schema of each of their JSON fields (constraints and example, from
    its modality's serving part)."""
    served = bentoml.get_current_service()
    return ({path for path, modality in MODALITY_OF_ENDPOINT.items()
             if modality == served.modality}, served.serving.api_fields(served.card, served.args))


def _invalid_argument(check, *args):
    """check(*args) in an endpoint's body, where BentoML answers InvalidArgument with HTTP 400
    (a ValueError there would be a 500)."""
    try:
        return check(*args)
    except ValueError as e:
        raise InvalidArgument(str(e)) from e


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
log_rejections_once(SERVE.max_error_chars)
cancel_request_timers()
time_out_connections(SERVE.idle_timeout_s, SERVE.header_timeout_s)
stop_server_when_a_worker_cannot_serve()  # in `bentoml serve` itself, before it starts workers
# PIL warns (two lines on stderr) when a header says over 89 Mpx; the image modality refuses such an
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
        """The model loaded and self-checked, or the whole server stopped with the reason
        (pipeline/serving/cannot_serve.py): retrying would fail the same way."""
        try:
            self._load(Path(self.model.path))
        except Exception as e:
            why = str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e}"
            exit_worker(f"model {ARGS.model_tag} cannot be served: {why}")

    def _load(self, folder: Path) -> None:
        self.card = card = read_card(folder)  # refuses a model.onnx whose sha256 is not the card's
        (weights,) = card.weights
        self.classes = card.classes
        # The served model's modality checks each endpoint's input and turns a checked batch
        # into the model's input (a text model's tokenizer sha256-checked against the card).
        self.modality, self.serving = card.recipe.data.modality, card_part(card, "serving")
        # params.yaml serve at packaging, with the modality's own limits by its schema
        self.args = read_limits(ARGS, self.modality)
        self.model_input = self.serving.model_input(folder, card)
        # One image or text: a single-threaded session run inline (waking threads costs more
        # than the model); batches: serve.batch_threads threads.
        self.single = onnx_predictor(folder / weights, 1)
        self.batch = onnx_predictor(folder / weights, SERVE.batch_threads)
        # Self-check before /readyz says yes: one blank image (or one text) must give one logit
        # per class, so a model that does not match its card never gets traffic (and the first
        # request does not pay ONNX Runtime's warm-up).
        one = self.serving.example(card)
        for predict in (self.single, self.batch):
            logits = predict(self.model_input(one))
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
            classes=self.classes, ready=self.__is_ready__,
            input=self.serving.grpc_metadata(self.card),
            batch=lambda request: self.serving.grpc_input(request, self.card, self.args),
            probabilities=self._grpc_probabilities)
        try:
            self.grpc = await oip.start(model, oip.http_host(), oip.grpc_port(SERVE.grpc_port),
                                        max_message_bytes=SERVE.max_request_bytes,
                                        max_error_chars=SERVE.max_error_chars)
        except oip.CannotListen as e:
            # A port in use does not free itself, nor does a bad KILN_GRPC_PORT.
            exit_worker(str(e))

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop(GRPC_STOP_GRACE_S)

    def _probabilities(self, batch, predict) -> np.ndarray:
        """A checked batch (the serving part's) -> float64 softmax (N, classes)."""
        return softmax(predict(self.model_input(batch)))

    async def _grpc_probabilities(self, batch) -> np.ndarray:
        """gRPC's _probabilities: one image or text inline on the event loop, as /classify and
        /classify_text run it; a batch on the batch session in a thread, as the batch
        endpoints run it."""
        if len(batch) == 1:
            return self._probabilities(batch, self.single)
        return await anyio.to_thread.run_sync(self._probabilities, batch, self.batch)

    def _predict(self, batch, predict) -> list[Prediction]:
        """A checked batch (the serving part's) -> one Prediction each."""
        probabilities = self._probabilities(batch, predict)
        return [
            Prediction(label=self.classes[int(i)], index=int(i),
                       probabilities=dict(zip(self.classes, map(float, row))))
            for i, row in zip(probabilities.argmax(axis=1), probabilities)
        ]

    def _classify_image(self, image: Image.Image) -> Prediction:
        pixels = _invalid_argument(self.serving.image_pixels, image, self.card)
        return self._predict(pixels, self.single)[0]

    @bentoml.api
    async def classify(self, image: Annotated[
            Image.Image, BeforeValidator(_image),
            Field(description="the image to classify: a PNG, JPEG, WebP, BMP, TIFF or GIF "
                              "file of one picture (not animated, not multi-page), any size "
                              "and colour mode")]) -> Prediction:
        """Classify one uploaded image (multipart field "image"): PNG, JPEG, WebP, BMP, TIFF or
        GIF, one picture.

        An image of up to image.serve.inline_decode_pixels is decoded and classified on the event
        loop (cheaper than the hop to a thread); a larger one, up to image.serve.max_image_pixels, in
        a worker thread, one at a time per worker, so it never holds the loop and a worker
        holds at most one large decoded image."""
        if image.width * image.height <= self.args.limits.inline_decode_pixels:
            return self._classify_image(image)
        if self.decode_slot is None:  # created on the event loop, as anyio requires
            self.decode_slot = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._classify_image, image, limiter=self.decode_slot)

    @bentoml.api(batchable=True, max_batch_size=SERVE.max_batch_items, max_latency_ms=5000)
    def classify_batch(self, images: Annotated[
            np.ndarray, AfterValidator(_images),
            Field(description="pixel values 0..255, shape (N, S, S) or (N, C, S, S) at the "
                              "model's input size S (the example: one blank image)")]) -> list[Prediction]:
        """Classify pixel arrays, values 0..255, shape (N, S, S) (grayscale models) or
        (N, C, S, S) at the model's input size, N <= serve.max_batch_items. Requests are
        batched together adaptively."""
        return self._predict(images, self.batch)

    @bentoml.api
    def classify_npy(self, array: Annotated[
            Path, _upload("image", "array"), *UPLOAD_SCHEMA, Field(
            description="a .npy file (numpy.save) of pixel values 0..255, uint8 or float, "
                        "shaped as /classify_batch's images")]) -> list[Prediction]:
        """Classify a binary pixel array: a .npy file (numpy.save, no pickles) uploaded as the
        multipart field "array", shapes and values as for /classify_batch."""
        pixels = _invalid_argument(_array, _upload_bytes(array))
        return self._predict(pixels, self.batch)

    @bentoml.api
    async def classify_text(self, text: Annotated[
            str, AfterValidator(_text),
            Field(description="the text to classify (text models): any UTF-8 text with a "
                              "visible character (a letter, digit, punctuation mark or symbol), "
                              "at most text.serve.max_text_bytes bytes; the model reads its first "
                              "text.preprocess.max_tokens tokens")]) -> Prediction:
        """Classify one text (JSON {"text": "..."}), tokenized by the model's saved tokenizer
        and classified on the event loop: ~17 us to tokenize and ~0.1 ms through an encoder of
        params.yaml text's size (docs/benchmarks.md, Text serving), about what a hop to a
        thread costs."""
        return self._predict([text], self.single)[0]

    @bentoml.api
    def classify_text_batch(self, texts: Annotated[
            list[str], AfterValidator(_texts),
            Field(description="texts to classify (text models): 1 to serve.max_batch_items "
                              "of them, each as /classify_text's text")]) -> list[Prediction]:
        """Classify several texts (JSON {"texts": ["...", ...]}) in one model call, padded to
        the longest of them; one answer per text, in order."""
        return self._predict(texts, self.batch)

    @bentoml.api
    def classify_audio(self, audio: Annotated[
            Path, _upload("audio", "audio"), *UPLOAD_SCHEMA, Field(
            description="the recording to classify (audio models): a WAV, FLAC, Ogg "
                        "(Vorbis, Opus), MP3, M4A or AAC (ADTS) file, any sample rate and "
                        "channel count, at most "
                        "audio.serve.max_seconds long; the model hears its centre "
                        "audio.preprocess.clip_seconds")]) -> Prediction:
        """Classify one uploaded recording (multipart field "audio"): decoded, mixed to mono,
        resampled to the model's rate and fitted to its clip length as training did. Not on
        the event loop (BentoML runs it in a thread): decoding costs 0.13-1.95 ms per second of
        audio (16 kHz mono to 44.1 kHz stereo, docs/benchmarks.md, Audio), up to ~20 ms for
        audio.serve.max_seconds, which other requests need not wait for."""
        clip = _invalid_argument(_audio, audio)
        return self._predict(clip, self.single)[0]


# First added is outermost: every rejection below is logged; the body is bounded before the
# guard reads it.
Classifier.add_asgi_middleware(ErrorAnswers, max_error_chars=SERVE.max_error_chars)
Classifier.add_asgi_middleware(RequestSizeLimit, max_bytes=SERVE.max_request_bytes)
Classifier.add_asgi_middleware(InputGuard, routes={
    api.route: tuple(api.input_spec.multipart_fields) for api in Classifier.apis.values()},
    checks={("/classify", "image"): _image_head, ("/classify_npy", "array"): _array_head,
            ("/classify_audio", "audio"): _audio_head})
Classifier.add_asgi_middleware(OfflineDocsPage)  # GET /: Swagger UI with nothing from outside
Classifier.add_asgi_middleware(PublishedSpec, served=_published)  # GET /docs.json
