"""The Open Inference Protocol v2 over gRPC (KServe / Triton `inference.GRPCInferenceService`):
a grpc.aio server that each BentoML worker of Kiln's service starts on its own event loop, beside
the HTTP API, serving the same ONNX Runtime sessions with the same checks (pipeline/serving/service.py
hands them over as a ServedModel). Server reflection is on.

    ServerLive, ServerReady   the worker is up / its model answered the self-check
    ServerMetadata            name "kiln", the Bento's version
    ModelReady, ModelMetadata the model by its BentoML name (package.model_name), version the
                              model tag's version ("" means the one served); another name is
                              NOT_FOUND
    ModelInfer                one input tensor, as the served model's modality reads it
                              (pipeline/modalities/<modality>/serving.py grpc_input): an image model's
                              "images", raw pixels 0..255, UINT8 or FP32, [N, C, S, S] (or
                              [N, S, S] for a grayscale model), as raw_input_contents
                              (little-endian) or typed contents (uint_contents, fp32_contents);
                              a text model's "texts", BYTES [N], one UTF-8 text per element, as
                              raw_input_contents (each element a 4-byte little-endian length,
                              then its bytes: KServe/Triton's BYTES serialisation) or
                              contents.bytes_contents; an audio model's "waveform", FP32
                              [N, clip_samples], decoded clips (mono at the model's rate,
                              values in [-1, 1]), raw or fp32_contents. Outputs
                              "probabilities" FP32 [N, K], "label" BYTES [N], "index" INT64
                              [N] as typed contents (all, or those named in the request's
                              outputs); the request's id is echoed

ModelMetadata's TensorMetadata has one datatype and shape per tensor and no parameters, so the
rest is in its `properties` (string -> string): "classes" (JSON list, an index's label is its
position), "input_datatypes" (an image model's "UINT8,FP32", a text model's "BYTES", an audio
model's "FP32"), "input_shapes" (JSON list of accepted shapes).

Bad input is answered INVALID_ARGUMENT (NOT_FOUND for an unknown model) with a message naming
the cause, never INTERNAL or UNKNOWN; a message over serve.max_request_bytes gets gRPC's own
RESOURCE_EXHAUSTED before it is read. Each rejection is one WARNING line, as for HTTP.

Every worker binds the same port with SO_REUSEPORT (the kernel spreads connections over them);
the host is the one the worker's HTTP socket is bound to (http_host).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
import numpy as np
import psutil
from grpc_reflection.v1alpha import reflection
from open_inference.grpc import protocol as pb
from open_inference.grpc import service as pb_service

from pipeline.serving.rejections import bounded

GRPC_PORT_ENV = "KILN_GRPC_PORT"  # overrides params.yaml serve.grpc_port, as BENTOML_PORT does HTTP's
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
OUTPUTS = ("probabilities", "label", "index")

log = logging.getLogger("bentoml.serve.kiln")  # the HTTP rejections' logger (pipeline/serving/http_guard.py)


@dataclass(frozen=True)
class ServedModel:
    """What the gRPC server serves, from the BentoML service that owns it."""
    name: str
    version: str
    server_version: str
    classes: list[str]
    ready: Callable[[], bool]
    # ModelMetadata's input tensor: its name, the datatypes and the shapes it accepts
    input: tuple[str, list[str], list[list[int]]]
    # A ModelInfer request -> its input as a checked batch, or ValueError naming the cause
    # (checked as the HTTP endpoints check: the modality's serving part, grpc_input)
    batch: Callable[[pb.ModelInferRequest], object]
    # A checked batch -> float64 (N, K)
    probabilities: Callable[[object], Awaitable[np.ndarray]]


class CannotListen(RuntimeError):
    """KILN_GRPC_PORT is not a port, or the port is held by another process; the message says
    which and how to choose another."""


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, message)


class InferenceService(pb_service.GRPCInferenceServiceServicer):
    def __init__(self, model: ServedModel, max_error_chars: int) -> None:
        self.model = model
        self.max_error_chars = max_error_chars

    @contextlib.asynccontextmanager
    async def _answered(self, context):
        """A Rejected raised inside becomes the call's status and message (context.abort
        raises), logged as one WARNING line; the message bounded (pipeline/serving/rejections.py): it
        quotes what the client sent."""
        try:
            yield
        except Rejected as e:
            message = bounded(str(e), self.max_error_chars)
            log.warning("gRPC %s: %s", e.code.name, message)
            await context.abort(e.code, message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.model.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kiln", version=self.model.server_version)

    async def ModelReady(self, request, context):
        async with self._answered(context):
            self._found(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.model.ready())

    async def ModelMetadata(self, request, context):
        async with self._answered(context):
            self._found(request.name, request.version)
            return self._metadata()

    async def ModelInfer(self, request, context):
        async with self._answered(context):
            self._found(request.model_name, request.model_version)
            wanted = self._requested_outputs(request)
            try:
                batch = self.model.batch(request)
            except ValueError as e:
                raise _invalid(str(e)) from None
            probabilities = await self.model.probabilities(batch)
            return self._response(request, probabilities, wanted)

    def _found(self, name: str, version: str) -> None:
        if name != self.model.name or version not in ("", self.model.version):
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"model {name!r} version {version!r} not found; this server serves "
                           f"{self.model.name!r} version {self.model.version!r} (or version '')")

    def _metadata(self) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        name, datatypes, shapes = self.model.input
        k = len(self.model.classes)
        return pb.ModelMetadataResponse(
            name=self.model.name, versions=[self.model.version], platform="onnxruntime_onnx",
            inputs=[tensor(name=name, datatype=datatypes[0], shape=shapes[0])],
            outputs=[tensor(name="probabilities", datatype="FP32", shape=[-1, k]),
                     tensor(name="label", datatype="BYTES", shape=[-1]),
                     tensor(name="index", datatype="INT64", shape=[-1])],
            properties={"classes": json.dumps(self.model.classes),
                        "input_datatypes": ",".join(datatypes),
                        "input_shapes": json.dumps(shapes)})

    def _requested_outputs(self, request) -> tuple[str, ...]:
        # Counted before they are read: one 8 MB message holds millions of empty entries.
        if len(request.outputs) > len(OUTPUTS):
            raise _invalid(f"outputs: {len(request.outputs)} requested; there are "
                           f"{len(OUTPUTS)} ({', '.join(OUTPUTS)})")
        names = tuple(output.name for output in request.outputs)
        unknown = [name for name in names if name not in OUTPUTS]
        if unknown:
            raise _invalid(f"outputs: no output named {unknown[0]!r}; outputs are "
                           f"{', '.join(OUTPUTS)}")
        return names or OUTPUTS

    def _response(self, request, probabilities: np.ndarray,
                  wanted: tuple[str, ...]) -> pb.ModelInferResponse:
        tensor, contents = pb.ModelInferResponse.InferOutputTensor, pb.InferTensorContents
        n, k = probabilities.shape
        index = probabilities.argmax(axis=1)
        build = {
            "probabilities": lambda: tensor(
                name="probabilities", datatype="FP32", shape=[n, k],
                contents=contents(fp32_contents=probabilities.astype(np.float32).ravel().tolist())),
            "label": lambda: tensor(
                name="label", datatype="BYTES", shape=[n],
                contents=contents(bytes_contents=[self.model.classes[i].encode() for i in index])),
            "index": lambda: tensor(name="index", datatype="INT64", shape=[n],
                                    contents=contents(int64_contents=index.tolist())),
        }
        return pb.ModelInferResponse(model_name=self.model.name, model_version=self.model.version,
                                     id=request.id, outputs=[build[name]() for name in wanted])


def input_tensor(request, name: str, serves: str, hint: str = "") -> tuple[object, bytes | None]:
    """A ModelInfer request's one input tensor, which must be named `name`, and its one
    raw_input_contents entry (None: the values are in its typed contents). Raises ValueError
    naming the cause; `serves` ("an image model") and `hint` (what `name` holds) go into it."""
    if len(request.inputs) > 1:  # counted first: a message may hold millions of them
        raise ValueError(f"inputs: expected one input tensor named {name!r}{hint}, got "
                         f"{len(request.inputs)}")
    names = [tensor.name for tensor in request.inputs]
    if names != [name]:
        other = next((n for n in names if n != name), None)
        served = f"; this server serves {serves}, which takes no {other!r}" if other else ""
        raise ValueError(f"inputs: expected one input tensor named {name!r}{hint}, got "
                         f"{names}{served}")
    tensor = request.inputs[0]
    if not request.raw_input_contents:
        return tensor, None
    if tensor.HasField("contents"):
        raise ValueError(f"{name}: both raw_input_contents and contents are set; send one of "
                         "them")
    if len(request.raw_input_contents) != 1:
        raise ValueError(f"raw_input_contents: {len(request.raw_input_contents)} entries for 1 "
                         "input tensor")
    return tensor, request.raw_input_contents[0]


def shape_of(tensor) -> str:
    """A request tensor's shape for a message, "[2, 8, 8]"; a client may send millions of
    dimensions, which are counted, not listed."""
    if len(tensor.shape) > 8:
        return f"of {len(tensor.shape)} dimensions"
    return str(list(tensor.shape))


def probabilities_of(response: pb.ModelInferResponse) -> np.ndarray:
    """The "probabilities" output of a ModelInfer response as float32 (N, K)."""
    (tensor,) = [o for o in response.outputs if o.name == "probabilities"]
    return np.array(tensor.contents.fp32_contents, np.float32).reshape(list(tensor.shape))


def grpc_port(configured: int) -> int:
    """KILN_GRPC_PORT if set, else `configured` (the Bento's serve.grpc_port)."""
    value = os.environ.get(GRPC_PORT_ENV)
    if value is None:
        return configured
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise CannotListen(f"{GRPC_PORT_ENV}={value!r}: expected a port number 1..65535")
    return int(value)


def http_host() -> str:
    """The address this worker's HTTP socket is bound to. BentoML's arbiter binds it (`bentoml
    serve --host`, BENTOML_HOST, or the service's http.host) and hands it to each worker as an
    inherited file descriptor, `--fd N` on the worker's command line; the worker learns no host
    otherwise."""
    argv = sys.argv
    fd = next((a.split("=", 1)[1] for a in argv if a.startswith("--fd=")), None)
    if fd is None and "--fd" in argv[:-1]:
        fd = argv[argv.index("--fd") + 1]
    if fd is None or not fd.isdigit():
        raise RuntimeError("gRPC: not in a BentoML worker (no --fd among its arguments): cannot "
                           "tell which host HTTP is bound to")
    with socket.socket(fileno=os.dup(int(fd))) as http_socket:
        return http_socket.getsockname()[0]


def _other_listeners(port: int) -> list[int]:
    """Pids of processes other than this worker and its sibling workers that listen on TCP
    `port`. SO_REUSEPORT lets any process of the same user bind it too: another Kiln server on
    the same port would silently share its connections with this one."""
    ours = {os.getpid(), *(p.pid for p in psutil.Process(os.getppid()).children())}
    # pid None: a socket whose owner psutil could not map, e.g. a sibling's that appeared
    # while the table was read (seen); another user's socket could not share the port anyway:
    # the bind below refuses it.
    return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   and c.pid is not None and c.pid not in ours})


def _taken(host: str, port: int, detail: str) -> str:
    return (f"gRPC port {port} on {host} is in use by another process ({detail}): choose another "
            f"with params.yaml serve.grpc_port or the {GRPC_PORT_ENV} environment variable")


def check_free(bento: str, host: str) -> None:
    """Raise CannotListen if the gRPC port `bento` would listen on (KILN_GRPC_PORT, else the
    Bento's serve.grpc_port) is taken on `host`. A worker that finds it taken stops the server
    (`bentoml serve` exits non-zero: pipeline/serving/cannot_serve.py); `make serve` asks first, so it
    refuses before anything has started, in one line."""
    import bentoml

    port = grpc_port(bentoml.bentos.get(bento).info.args["serve"]["grpc_port"])
    # No SO_REUSEPORT: the bind fails if anything listens there, a server sharing the port too.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise CannotListen(_taken(host, port, e.strerror)) from None


async def start(model: ServedModel, host: str, port: int, max_message_bytes: int,
                max_error_chars: int) -> grpc.aio.Server:
    """A running grpc.aio server for `model` on host:port, shared with sibling workers; raises
    CannotListen naming the port, serve.grpc_port and KILN_GRPC_PORT if anything else has it.
    A rejection's status message is at most max_error_chars characters."""
    others = _other_listeners(port)
    if others:
        raise CannotListen(_taken(host, port, f"pid {', '.join(map(str, others))}"))
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1),
                                      ("grpc.max_receive_message_length", max_message_bytes)])
    pb_service.add_GRPCInferenceServiceServicer_to_server(InferenceService(model, max_error_chars),
                                                          server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:  # grpc: "Failed to bind to address ..."
        raise CannotListen(_taken(host, port, str(e))) from None
    await server.start()
    log.info("gRPC (Open Inference Protocol v2) listening on %s", address)
    return server


if __name__ == "__main__":  # `python -m pipeline.serving.oip BENTO HOST`: make serve's check_free
    try:
        check_free(*sys.argv[1:])
    except CannotListen as e:
        sys.exit(f"make serve: {e}")
