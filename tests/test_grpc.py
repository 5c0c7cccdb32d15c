"""gRPC beside REST: the Open Inference Protocol v2 served by the same `bentoml serve` processes
as the HTTP API (tests/conftest.py's packaged tiny Bento, shared with tests/test_service.py),
queried as a client would: reflection, health, metadata, ModelInfer against REST's answers for
the same pixels, bad input, the bound host and a port already in use."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import psutil
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase
from open_inference.grpc import protocol as pb
from open_inference.grpc.service import GRPCInferenceServiceStub

from pipeline.params import load_params
from pipeline.lifecycle.local_server import free_port
from tests.tiny_bento import CLASSES, REPO, SIZE, class_images

pytestmark = pytest.mark.slow
SERVE = load_params(REPO / "params.yaml").serve


@pytest.fixture(scope="module")
def grpc_server(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server['client'].grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    name, version = server["report"]["champion"]["model_tag"].split(":")
    yield {**server, "channel": channel, "stub": GRPCInferenceServiceStub(channel),
           "model": name, "version": version}
    channel.close()


def infer_request(model: str, images: np.ndarray, datatype: str = "UINT8", raw: bool = True,
                  **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name="images", datatype=datatype, shape=list(images.shape))
    if raw:
        request.raw_input_contents.append(images.astype({"UINT8": "<u1", "FP32": "<f4"}[datatype]).tobytes())
    elif datatype == "UINT8":
        tensor.contents.uint_contents.extend(images.ravel().tolist())
    else:
        tensor.contents.fp32_contents.extend(images.ravel().tolist())
    return request


def outputs(response: pb.ModelInferResponse) -> dict:
    by_name = {o.name: o for o in response.outputs}
    result = {}
    if "probabilities" in by_name:
        o = by_name["probabilities"]
        assert o.datatype == "FP32"
        result["probabilities"] = np.array(o.contents.fp32_contents).reshape(list(o.shape))
    if "label" in by_name:
        o = by_name["label"]
        assert o.datatype == "BYTES" and len(o.shape) == 1
        result["label"] = [b.decode() for b in o.contents.bytes_contents]
    if "index" in by_name:
        o = by_name["index"]
        assert o.datatype == "INT64" and len(o.shape) == 1
        result["index"] = list(o.contents.int64_contents)
    return result


def test_reflection_lists_the_inference_service(grpc_server):
    services = ProtoReflectionDescriptorDatabase(grpc_server["channel"]).get_services()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


def test_live_ready_and_server_metadata(grpc_server):
    stub, model = grpc_server["stub"], grpc_server["model"]
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name=model)).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name=model, version=grpc_server["version"])).ready
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest())
    bento_version = grpc_server["report"]["champion"]["bento_tag"].split(":")[1]
    assert (metadata.name, metadata.version) == ("kiln", bento_version)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelReady(pb.ModelReadyRequest(name="resnet"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and model in e.value.details()


def test_model_metadata_states_input_outputs_and_classes(grpc_server):
    metadata = grpc_server["stub"].ModelMetadata(pb.ModelMetadataRequest(name=grpc_server["model"]))
    assert metadata.name == grpc_server["model"] and list(metadata.versions) == [grpc_server["version"]]
    assert metadata.platform == "onnxruntime_onnx"
    (tensor,) = metadata.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("images", "UINT8", [-1, 1, SIZE, SIZE])
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == [
        ("probabilities", "FP32", [-1, len(CLASSES)]), ("label", "BYTES", [-1]), ("index", "INT64", [-1])]
    assert json.loads(metadata.properties["classes"]) == CLASSES
    assert metadata.properties["input_datatypes"] == "UINT8,FP32"
    assert json.loads(metadata.properties["input_shapes"]) == [[-1, 1, SIZE, SIZE], [-1, SIZE, SIZE]]


def test_model_infer_answers_as_rest_does(grpc_server):
    """UINT8 as raw bytes and FP32 as typed contents, [N, 1, S, S] and [N, S, S], one image and
    a batch: the same labels, indices and probabilities as REST's /classify_batch."""
    stub, model = grpc_server["stub"], grpc_server["model"]
    images, labels = class_images(12, seed=3)
    rest = grpc_server["client"].post("/classify_batch", json={"images": images.tolist()})
    assert rest.status_code == 200, rest.text
    rest_probabilities = np.array([[p["probabilities"][c] for c in CLASSES] for p in rest.json()])
    assert [p["index"] for p in rest.json()] == labels.tolist()  # the tiny model gets them right
    cases = [(images[:, None], "UINT8", True), (images.astype(np.float32), "FP32", False),
             (images, "UINT8", False), (images[:, None].astype(np.float32), "FP32", True)]
    for batch, datatype, raw in cases:
        response = stub.ModelInfer(infer_request(model, batch, datatype, raw, id=f"r-{datatype}"))
        assert (response.model_name, response.model_version, response.id) == (
            model, grpc_server["version"], f"r-{datatype}")
        got = outputs(response)
        assert got["index"] == labels.tolist(), (datatype, raw)
        assert got["label"] == [p["label"] for p in rest.json()]
        assert got["probabilities"] == pytest.approx(rest_probabilities, abs=1e-6)
    for i in range(3):  # one image at a time (the single-image session)
        got = outputs(stub.ModelInfer(infer_request(model, images[i:i + 1])))
        assert got["index"] == [labels[i]]
        assert got["probabilities"][0] == pytest.approx(rest_probabilities[i], abs=1e-6)
    only = infer_request(model, images[:2], outputs=[{"name": "label"}])
    assert [o.name for o in stub.ModelInfer(only).outputs] == ["label"]


def test_bad_input_gets_invalid_argument_naming_the_cause(grpc_server):
    stub, model = grpc_server["stub"], grpc_server["model"]
    images, _ = class_images(2, seed=4)
    nan = images.astype(np.float32)
    nan[0, 0, 0] = np.nan
    too_many = np.zeros((SERVE.max_batch_items + 1, SIZE, SIZE), np.uint8)

    def with_raw(request, data):
        del request.raw_input_contents[:]
        request.raw_input_contents.append(data)
        return request

    def both(request):
        request.inputs[0].contents.uint_contents.extend(images.ravel().tolist())
        return request

    def typed_over_255():
        request = infer_request(model, images, raw=False)
        request.inputs[0].contents.uint_contents[0] = 300
        return request

    invalid = {
        "wrong datatype": (pb.ModelInferRequest(
            model_name=model, inputs=[{"name": "images", "datatype": "FP64", "shape": [2, SIZE, SIZE]}]),
            "datatype 'FP64' not accepted; send pixel values 0..255 as UINT8 or FP32"),
        "shape not the model's": (infer_request(model, np.zeros((2, SIZE + 1, SIZE - 1), np.uint8)),
                                  f"expected shape (N, {SIZE}, {SIZE}) or (N, 1, {SIZE}, {SIZE}), got (2, 9, 7)"),
        "raw bytes too short": (with_raw(infer_request(model, images), images.tobytes()[:-1]),
                                f"shape [2, {SIZE}, {SIZE}] of UINT8 is 128 bytes; raw_input_contents[0] holds 127 bytes"),
        "typed contents count": (pb.ModelInferRequest(
            model_name=model, inputs=[{"name": "images", "datatype": "FP32", "shape": [2, SIZE, SIZE],
                                       "contents": {"fp32_contents": [0.0] * 5}}]),
            f"shape [2, {SIZE}, {SIZE}] has 128 values; contents.fp32_contents holds 5"),
        "empty batch": (infer_request(model, np.zeros((0, SIZE, SIZE), np.uint8)), "empty batch"),
        "too many images": (infer_request(model, too_many),
                            f"{len(too_many)} images; at most {SERVE.max_batch_items} images per request"),
        "NaN": (infer_request(model, nan, "FP32"), "pixel values must be finite and within 0..255"),
        "over 255": (infer_request(model, images.astype(np.float32) + 300, "FP32", raw=False),
                     "pixel values must be finite and within 0..255"),
        "typed UINT8 over 255": (typed_over_255(), "pixel values must be finite and within 0..255"),
        "negative dimension": (pb.ModelInferRequest(model_name=model, inputs=[
            {"name": "images", "datatype": "UINT8", "shape": [-1, SIZE, SIZE]}]), "negative dimension"),
        "raw and contents": (both(infer_request(model, images)), "both raw_input_contents and contents"),
        "no inputs": (pb.ModelInferRequest(model_name=model), "expected one input tensor named 'images', got []"),
        "wrong input name": (pb.ModelInferRequest(model_name=model, inputs=[
            {"name": "input", "datatype": "UINT8", "shape": [1, SIZE, SIZE]}]),
            "expected one input tensor named 'images', got ['input']"),
        "two raw buffers": (pb.ModelInferRequest(
            model_name=model, inputs=[{"name": "images", "datatype": "UINT8", "shape": [2, SIZE, SIZE]}],
            raw_input_contents=[images.tobytes(), b""]), "raw_input_contents: 2 entries for 1 input"),
        "unknown output": (infer_request(model, images, outputs=[{"name": "logits"}]),
                           "no output named 'logits'"),
        "text to an image model": (pb.ModelInferRequest(model_name=model, inputs=[
            {"name": "texts", "datatype": "BYTES", "shape": [1],
             "contents": {"bytes_contents": [b"a text"]}}]),
            "got ['texts']; this server serves an image model, which takes no 'texts'"),
    }
    for case, (request, message) in invalid.items():
        with pytest.raises(grpc.RpcError) as e:
            grpc_server["stub"].ModelInfer(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value.details())
        assert message in e.value.details(), (case, e.value.details())
    for request in (infer_request("resnet", images), infer_request(model, images, model_version="7")):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
        assert f"this server serves {model!r}" in e.value.details()
    # Over serve.max_request_bytes: gRPC refuses the message itself.
    huge = pb.ModelInferRequest(model_name=model, raw_input_contents=[bytes(SERVE.max_request_bytes)])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(huge)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    # Still serving, both protocols.
    assert outputs(stub.ModelInfer(infer_request(model, images)))["index"] == [0, 1]
    assert grpc_server["client"].get("/readyz").status_code == 200
    log = grpc_server["log"].read_text()
    assert "gRPC INVALID_ARGUMENT: images: empty batch" in log and "Traceback" not in log


def test_what_a_client_sent_is_quoted_bounded_and_escaped_in_statuses_and_logs(grpc_server):
    """A 7 MB model name with a newline and an escape sequence (it was echoed whole into the
    status and a 7.3 MB log line per call): the status and the log line give at most
    serve.max_error_chars characters of it, escaped, and the rest is counted."""
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server['client'].grpc_port}",
                                    options=[("grpc.max_send_message_length", 16 << 20)])
    name = "m" * 7_000_000 + "\n2026-01-01T00:00:00+0000 [INFO] forged\x1b[2J"
    with channel, pytest.raises(grpc.RpcError) as e:
        GRPCInferenceServiceStub(channel).ModelInfer(infer_request(name, np.zeros((1, SIZE, SIZE))))
    details = e.value.details()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(details) <= SERVE.max_error_chars + 40 and details.isprintable(), details[-200:]
    assert details.startswith("model 'mmm") and details.endswith(" more characters)"), details[-100:]
    deadline = time.monotonic() + 10  # s: the worker's line reaches the log file on its own time
    while not (lines := [line for line in grpc_server["log"].read_text().splitlines()
                         if "gRPC NOT_FOUND: model 'mmm" in line]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lines and all(len(line) <= SERVE.max_error_chars + 400 for line in lines), \
        [len(line) for line in lines]
    assert not any(line.startswith("2026-01-01") for line in grpc_server["log"].read_text().splitlines())


def test_millions_of_inputs_or_outputs_are_counted_before_they_are_read(grpc_server):
    """One 8 MB message can hold a million empty input or output entries: each is refused by its
    count, before the entries are read one by one."""
    stub, model = grpc_server["stub"], grpc_server["model"]
    outputs = infer_request(model, np.zeros((1, SIZE, SIZE), np.uint8))
    outputs.outputs.extend([pb.ModelInferRequest.InferRequestedOutputTensor()] * 1_000_000)
    inputs = pb.ModelInferRequest(model_name=model)
    inputs.inputs.extend([pb.ModelInferRequest.InferInputTensor()] * 1_000_000)
    dimensions = pb.ModelInferRequest(model_name=model)
    dimensions.inputs.add(name="images", datatype="UINT8", shape=[1] * 1_000_000)
    cases = {"outputs": (outputs, "outputs: 1000000 requested; there are 3"),
             "inputs": (inputs, "inputs: expected one input tensor named 'images', got 1000000"),
             "dimensions": (dimensions, "images: shape of 1000000 dimensions; expected [N, 1, "
                                        f"{SIZE}, {SIZE}] or [N, {SIZE}, {SIZE}]")}
    for case, (request, message) in cases.items():
        assert request.ByteSize() <= SERVE.max_request_bytes, case
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value.details())
        assert message in e.value.details(), (case, e.value.details())


def test_grpc_binds_loopback_like_http_on_one_port_for_every_worker(grpc_server):
    """Served with no --host: HTTP and gRPC are both on 127.0.0.1; every worker listens on the
    gRPC port (SO_REUSEPORT)."""
    port = grpc_server["client"].grpc_port
    workers = SERVE.workers or psutil.cpu_count()
    deadline = time.monotonic() + 30  # /readyz answered once one worker was up
    while True:
        listening = [c for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        if len({c.pid for c in listening}) >= workers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # gRPC listens on IPv6 sockets; 127.0.0.1 as the v4-mapped ::ffff:127.0.0.1.
    assert {ip.ipv4_mapped or ip if ip.version == 6 else ip
            for ip in (ipaddress.ip_address(c.laddr.ip) for c in listening)} \
        == {ipaddress.ip_address("127.0.0.1")}
    assert len({c.pid for c in listening}) == workers
    outside = [a.address for addresses in psutil.net_if_addrs().values() for a in addresses
               if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]
    for address in outside:  # this machine's other addresses: nothing listens there
        with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), 2):
            pass
    assert f"gRPC (Open Inference Protocol v2) listening on 127.0.0.1:{port}" in grpc_server["log"].read_text()


def stopped_server_output(packaged, grpc_port: str) -> str:
    """`bentoml serve` of the packaged Bento with KILN_GRPC_PORT=grpc_port, which must stop by
    itself within 60 s, exiting non-zero (pipeline/serving/cannot_serve.py): its output."""
    from pipeline.serving.cannot_serve import EXIT_CODE

    env = {**os.environ, "BENTOML_HOME": str(packaged["home"]), "KILN_GRPC_PORT": grpc_port}
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", packaged["report"]["champion"]["bento_tag"],
         "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_CODE, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def test_a_grpc_port_in_use_stops_the_server_naming_the_port(packaged):
    """Another process listens on the port with SO_REUSEPORT, as another Kiln server would (it
    could otherwise share the port silently): `bentoml serve` stops, non-zero, saying why,
    instead of restarting its workers forever."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        output = stopped_server_output(packaged, str(port))
    assert (f"gRPC port {port} on 127.0.0.1 is in use by another process (pid {os.getpid()}): "
            "choose another with params.yaml serve.grpc_port or the KILN_GRPC_PORT environment "
            "variable") in output


def test_a_kiln_grpc_port_that_is_not_a_port_stops_the_server_naming_it(packaged):
    output = stopped_server_output(packaged, "50o51")
    assert "KILN_GRPC_PORT='50o51': expected a port number 1..65535" in output


def test_make_serves_port_check_exits_non_zero_naming_a_port_in_use(packaged):
    """`make serve` first runs `python -m pipeline.serving.oip BENTO HOST`, so a port in use is refused
    before anything starts: non-zero and the reason if the port is taken, silent and 0 if it is
    free."""
    bento = packaged["report"]["champion"]["bento_tag"]

    def check(grpc_port: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "BENTOML_HOME": str(packaged["home"]), "KILN_GRPC_PORT": str(grpc_port)}
        return subprocess.run([sys.executable, "-m", "pipeline.serving.oip", bento, "127.0.0.1"], env=env,
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        taken = check(port)
    assert taken.returncode != 0
    assert (f"make serve: gRPC port {port} on 127.0.0.1 is in use by another process (Address "
            "already in use): choose another with params.yaml serve.grpc_port or the "
            "KILN_GRPC_PORT environment variable") in taken.stderr
    free = check(free_port())
    assert (free.returncode, free.stdout, free.stderr) == (0, "", "")
