"""The Open Inference Protocol v2 over gRPC (KServe / Triton `inference.GRPCInferenceService`):
a grpc.aio server that each BentoML worker of Kiln's service starts on its own event loop, beside
the HTTP API, serving the same ONNX Runtime sessions with the same checks (pipeline/service.py
hands them over as a ServedModel). Server reflection is on.

    ServerLive, ServerReady   the worker is up / its model answered the self-check
    ServerMetadata            name "kiln", the Bento's version
    ModelReady, ModelMetadata the model by its BentoML name (package.model_name), version the
                              model tag's version ("" means the one served); another name is
                              NOT_FOUND
    ModelInfer                one input "images": raw pixels 0..255, datatype UINT8 or FP32,
                              shape [N, C, S, S] (or [N, S, S] for a grayscale model), sent as
                              raw_input_contents (little-endian) or typed contents
                              (uint_contents for UINT8, fp32_contents for FP32); outputs
                              "probabilities" FP32 [N, K], "label" BYTES [N], "index" INT64 [N]
                              as typed contents (all, or those named in the request's outputs);
                              the request's id is echoed
                              A text model takes instead one input "texts": datatype BYTES,
                              shape [N], each element one UTF-8 text, sent as
                              raw_input_contents (each element a 4-byte little-endian length,
                              then its bytes: KServe/Triton's BYTES serialisation) or
                              contents.bytes_contents; the same outputs

ModelMetadata's TensorMetadata has one datatype and shape per tensor and no parameters, so the
rest is in its `properties` (string -> string): "classes" (JSON list, an index's label is its
position), "input_datatypes" ("UINT8,FP32", a text model's "BYTES"), "input_shapes" (JSON list
of accepted shapes).

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

GRPC_PORT_ENV = "KILN_GRPC_PORT"  # overrides params.yaml serve.grpc_port, as BENTOML_PORT does HTTP's
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INPUT = "images"
TEXT_INPUT = "texts"  # a text model's one input, BYTES [N]
# OIP datatype -> (dtype of its raw bytes, typed contents field, dtype the contents are read as:
# uint_contents holds uint32, so a value over 255 is seen and refused instead of wrapping)
DATATYPES = {"UINT8": (np.dtype("<u1"), "uint_contents", np.uint32),
             "FP32": (np.dtype("<f4"), "fp32_contents", np.float32)}
OUTPUTS = ("probabilities", "label", "index")

log = logging.getLogger("bentoml.serve.kiln")  # the HTTP rejections' logger (pipeline/http_guard.py)


@dataclass(frozen=True)
class ServedModel:
    """What the gRPC server serves, from the BentoML service that owns it."""
    name: str
    version: str
    server_version: str
    classes: list[str]
    input_shape: tuple[int, int, int] | None  # (C, S, S); None: a text model
    ready: Callable[[], bool]
    # The HTTP endpoints' pixel check: any numeric array -> float32 (N, C, S, S), or ValueError
    # naming the cause (shape, empty or too large a batch, values not finite or outside 0..255).
    pixels: Callable[[np.ndarray], np.ndarray]
    # The text endpoints' check: list of str -> the same list, or ValueError naming the cause
    # (none or too many texts, one empty, whitespace only or over serve.max_text_bytes).
    texts: Callable[[list[str]], list[str]]
    # Checked pixels or texts -> float64 (N, K)
    probabilities: Callable[[np.ndarray | list[str]], Awaitable[np.ndarray]]


class CannotListen(RuntimeError):
    """KILN_GRPC_PORT is not a port, or the port is held by another process; the message says
    which and how to choose another."""


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, message)


@contextlib.asynccontextmanager
async def _answered(context):
    """A Rejected raised inside becomes the call's status and message (context.abort raises),
    logged as one WARNING line."""
    try:
        yield
    except Rejected as e:
        log.warning("gRPC %s: %s", e.code.name, e)
        await context.abort(e.code, str(e))


def accepted_shapes(input_shape: tuple[int, int, int]) -> list[list[int]]:
    c, s, _ = input_shape
    return [[-1, c, s, s], *([[-1, s, s]] if c == 1 else [])]


class InferenceService(pb_service.GRPCInferenceServiceServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.model.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kiln", version=self.model.server_version)

    async def ModelReady(self, request, context):
        async with _answered(context):
            self._found(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.model.ready())

    async def ModelMetadata(self, request, context):
        async with _answered(context):
            self._found(request.name, request.version)
            return self._metadata()

    async def ModelInfer(self, request, context):
        async with _answered(context):
            self._found(request.model_name, request.model_version)
            wanted = self._requested_outputs(request)
            batch = self._pixels(request) if self.model.input_shape else self._texts(request)
            probabilities = await self.model.probabilities(batch)
            return self._response(request, probabilities, wanted)

    def _found(self, name: str, version: str) -> None:
        if name != self.model.name or version not in ("", self.model.version):
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"model {name!r} version {version!r} not found; this server serves "
                           f"{self.model.name!r} version {self.model.version!r} (or version '')")

    def _metadata(self) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        if self.model.input_shape is None:
            name, datatypes, shapes = TEXT_INPUT, ["BYTES"], [[-1]]
        else:
            name, datatypes, shapes = INPUT, list(DATATYPES), accepted_shapes(self.model.input_shape)
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
        names = tuple(output.name for output in request.outputs)
        unknown = [name for name in names if name not in OUTPUTS]
        if unknown:
            raise _invalid(f"outputs: no output named {unknown[0]!r}; outputs are "
                           f"{', '.join(OUTPUTS)}")
        return names or OUTPUTS

    def _pixels(self, request) -> np.ndarray:
        """The request's one input tensor as float32 (N, C, S, S), checked as HTTP checks it."""
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            names = [tensor.name for tensor in request.inputs]
            served = (f"; this server serves an image model, which takes no {TEXT_INPUT!r}"
                      if TEXT_INPUT in names else "")
            raise _invalid(f"inputs: expected one input tensor named {INPUT!r}, got "
                           f"{names}{served}")
        tensor = request.inputs[0]
        if tensor.datatype not in DATATYPES:
            raise _invalid(f"{INPUT}: datatype {tensor.datatype!r} not accepted; send pixel "
                           f"values 0..255 as {' or '.join(DATATYPES)}")
        raw_dtype, field, typed_dtype = DATATYPES[tensor.datatype]
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise _invalid(f"{INPUT}: shape {shape} has a negative dimension")
        count = int(np.prod(shape, dtype=object))  # Python ints: a hostile shape cannot overflow
        if request.raw_input_contents:
            if tensor.HasField("contents"):
                raise _invalid(f"{INPUT}: both raw_input_contents and contents are set; send "
                               f"one of them")
            if len(request.raw_input_contents) != 1:
                raise _invalid(f"raw_input_contents: {len(request.raw_input_contents)} entries "
                               f"for 1 input tensor")
            data = request.raw_input_contents[0]
            if len(data) != count * raw_dtype.itemsize:
                raise _invalid(f"{INPUT}: shape {shape} of {tensor.datatype} is "
                               f"{count * raw_dtype.itemsize} bytes; raw_input_contents[0] "
                               f"holds {len(data)} bytes")
            array = np.frombuffer(data, raw_dtype)
        else:
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise _invalid(f"{INPUT}: shape {shape} has {count} values; contents.{field} "
                               f"holds {len(values)} (a {tensor.datatype} tensor's values go "
                               f"in contents.{field} or raw_input_contents)")
            array = np.array(values, typed_dtype)
        try:
            return self.model.pixels(array.reshape(shape))
        except ValueError as e:
            raise _invalid(str(e)) from None

    def _texts(self, request) -> list[str]:
        """The request's one BYTES input tensor "texts" [N] as N texts, each decoded as UTF-8
        and checked as HTTP checks them."""
        if len(request.inputs) != 1 or request.inputs[0].name != TEXT_INPUT:
            names = [tensor.name for tensor in request.inputs]
            served = (f"; this server serves a text model, which takes no {INPUT!r}"
                      if INPUT in names else "")
            raise _invalid(f"inputs: expected one input tensor named {TEXT_INPUT!r} (BYTES "
                           f"[N], UTF-8 texts), got {names}{served}")
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise _invalid(f"{TEXT_INPUT}: datatype {tensor.datatype!r} not accepted; send "
                           "UTF-8 texts as BYTES")
        shape = list(tensor.shape)
        if len(shape) != 1 or shape[0] < 0:
            raise _invalid(f"{TEXT_INPUT}: shape {shape}; expected [N], one element per text")
        if request.raw_input_contents:
            if tensor.HasField("contents"):
                raise _invalid(f"{TEXT_INPUT}: both raw_input_contents and contents are set; "
                               "send one of them")
            if len(request.raw_input_contents) != 1:
                raise _invalid(f"raw_input_contents: {len(request.raw_input_contents)} entries "
                               f"for 1 input tensor")
            elements = _bytes_elements(request.raw_input_contents[0], shape[0])
            where = "raw_input_contents[0]"
        else:
            elements = list(tensor.contents.bytes_contents)
            where = "contents.bytes_contents"
        if len(elements) != shape[0]:
            raise _invalid(f"{TEXT_INPUT}: shape {shape}; {where} holds {len(elements)} "
                           f"elements")
        texts = []
        for i, element in enumerate(elements):
            try:
                texts.append(element.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise _invalid(f"{TEXT_INPUT}[{i}]: not valid UTF-8 ({e.reason} at byte "
                               f"{e.start})") from None
        try:
            return self.model.texts(texts)
        except ValueError as e:
            raise _invalid(str(e)) from None

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


def infer_request(model: str, version: str, pixels: np.ndarray) -> pb.ModelInferRequest:
    """A client's ModelInfer request for uint8 or float32 pixels (N, C, S, S), sent as raw
    little-endian bytes (package's infra validation and bench/serve_bench.py use it)."""
    datatype = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[pixels.dtype]
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[{"name": INPUT, "datatype": datatype, "shape": list(pixels.shape)}],
        outputs=[{"name": "probabilities"}],
        raw_input_contents=[pixels.astype(DATATYPES[datatype][0], copy=False).tobytes()])


def text_infer_request(model: str, version: str, texts: list[str]) -> pb.ModelInferRequest:
    """A client's ModelInfer request for a text model: texts as one BYTES tensor [N] in
    raw_input_contents (package's infra validation and bench/serve_bench.py use it)."""
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [len(texts)]}],
        outputs=[{"name": "probabilities"}],
        raw_input_contents=[b"".join(len(b).to_bytes(4, "little") + b
                                     for b in (t.encode("utf-8") for t in texts))])


def _bytes_elements(data: bytes, expected: int) -> list[bytes]:
    """A BYTES tensor's raw contents -> its elements: each a 4-byte little-endian length, then
    that many bytes (KServe/Triton); read up to one past `expected` (the count its shape says),
    so a message of millions of empty elements is not split whole."""
    elements, at = [], 0
    while at < len(data) and len(elements) <= expected:
        if at + 4 > len(data):
            raise _invalid(f"raw_input_contents[0]: element {len(elements)} has {len(data) - at} "
                           "bytes of its 4-byte length prefix; BYTES elements are a 4-byte "
                           "little-endian length, then the bytes")
        size = int.from_bytes(data[at:at + 4], "little")
        if at + 4 + size > len(data):
            raise _invalid(f"raw_input_contents[0]: element {len(elements)} says {size} bytes; "
                           f"{len(data) - at - 4} remain")
        elements.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return elements


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
    Bento's serve.grpc_port) is taken on `host`. A worker that finds it taken stops the server,
    but `bentoml serve` then exits 0 (BentoML's arbiter does on any stop), so `make serve` asks
    first and exits non-zero."""
    import bentoml

    port = grpc_port(bentoml.bentos.get(bento).info.args["serve"]["grpc_port"])
    # No SO_REUSEPORT: the bind fails if anything listens there, a server sharing the port too.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise CannotListen(_taken(host, port, e.strerror)) from None


async def start(model: ServedModel, host: str, port: int, max_message_bytes: int) -> grpc.aio.Server:
    """A running grpc.aio server for `model` on host:port, shared with sibling workers; raises
    CannotListen naming the port, serve.grpc_port and KILN_GRPC_PORT if anything else has it."""
    others = _other_listeners(port)
    if others:
        raise CannotListen(_taken(host, port, f"pid {', '.join(map(str, others))}"))
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1),
                                      ("grpc.max_receive_message_length", max_message_bytes)])
    pb_service.add_GRPCInferenceServiceServicer_to_server(InferenceService(model), server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:  # grpc: "Failed to bind to address ..."
        raise CannotListen(_taken(host, port, str(e))) from None
    await server.start()
    log.info("gRPC (Open Inference Protocol v2) listening on %s", address)
    return server


if __name__ == "__main__":  # `python -m pipeline.oip BENTO HOST`: make serve's check_free
    try:
        check_free(*sys.argv[1:])
    except CannotListen as e:
        sys.exit(f"make serve: {e}")
