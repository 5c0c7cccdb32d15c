"""Packaging and serving: `python -m pipeline.stages package` on a real tiny ONNX model, then the built
Bento served by `bentoml serve` on a free loopback port and checked over HTTP against ONNX Runtime
run locally with the same preprocessing: every endpoint, bad and oversized input, readiness and
Prometheus metrics."""
from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from pipeline import StageError
from pipeline.core.card import sha256_file
from pipeline.params import load_params
from pipeline.lifecycle.local_server import free_ports, serving
from tests.bento_server import bento_server, fuzz_finds_no_server_error, multipart
from tests.browser import offline_page
from tests.tiny_bento import (CLASSES, PREPROCESSING, SIZE, class_images, encode,
                              local_probabilities, npy, stage_env, write_tiny_model)

REPO = Path(__file__).resolve().parent.parent
SERVE = load_params(REPO / "params.yaml").serve
IMAGE_LIMITS = load_params(REPO / "params.yaml").image.serve  # the served model's own limits
def test_package_refuses_a_missing_or_corrupt_model_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))  # before bentoml is imported
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")
    from pipeline.lifecycle.champion import Exports
    from pipeline.stages.package import package

    params = load_params(REPO / "params.yaml")
    model_dir = tmp_path / "selected"
    model_dir.mkdir()

    def run():
        package(model_dir, REPO / "bentofile.yaml", tmp_path, tmp_path / "profile.json",
                tmp_path / "champion.json", Exports(tmp_path / "champion"), params.package,
                params.serve, {"image": params.image.serve}, params.data.seed)

    with pytest.raises(StageError, match=r"selected/model\.json: model card not found"):
        run()
    write_tiny_model(tmp_path / "tiny", steps=0)
    (model_dir / "model.json").write_bytes((tmp_path / "tiny" / "model.json").read_bytes())
    with pytest.raises(StageError, match=r"selected/model\.onnx: weights file missing"):
        run()
    data = bytearray((tmp_path / "tiny" / "model.onnx").read_bytes())
    data[-100] ^= 0xFF  # one flipped byte, as in a damaged cache object
    (model_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"selected/model\.onnx: sha256 .* does not match"):
        run()
    assert not (tmp_path / "bentoml" / "models").exists()


@pytest.mark.slow
def test_package_stores_labelled_model_and_lean_bento_pinned_to_it(packaged):
    from pipeline.lifecycle.bento_build import git_revision

    report = packaged["report"]
    model_tag, bento_tag = report["champion"]["model_tag"], report["champion"]["bento_tag"]
    assert model_tag.startswith("kiln-classifier:") and bento_tag.startswith("kiln:")
    assert report["challenger"]["model_tag"] == model_tag and report["challenger_serves"] is True
    assert "infra validation (12 test images" in packaged["stdout"]
    assert bento_tag in packaged["stdout"] and "make serve" in packaged["stdout"]
    name, version = model_tag.split(":")
    stored = packaged["home"] / "models" / name / version
    info = yaml.safe_load((stored / "model.yaml").read_text())
    assert info["labels"]["variant"] == "float_onnx"
    assert info["labels"]["accuracy"] == "1.0000" and info["labels"]["macro_f1"] == "1.0000"
    assert info["labels"]["git"] == git_revision(REPO) != "unknown"
    assert (stored / "model.onnx").read_bytes() == (packaged["model_dir"] / "model.onnx").read_bytes()
    assert (stored / "model.json").read_bytes() == (packaged["model_dir"] / "model.json").read_bytes()

    name, version = bento_tag.split(":")
    bento = packaged["home"] / "bentos" / name / version
    sources = sorted(p.relative_to(bento / "src").as_posix()  # bytecode: written by serving it
                     for p in (bento / "src").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    # the service's files with the served modality's code only (an image model's here)
    assert sources == sorted([
        "bentofile.yaml", "pipeline/__init__.py", "pipeline/params.py",
        "pipeline/core/__init__.py", "pipeline/core/card.py", "pipeline/core/modality.py",
        "pipeline/modalities/__init__.py", "pipeline/modalities/image/__init__.py",
        "pipeline/modalities/image/config.py", "pipeline/modalities/image/preprocess.py",
        "pipeline/modalities/image/serving.py",
        *(f"pipeline/serving/{name}.py" for name in (
            "__init__", "api_docs", "cannot_serve", "http_guard", "oip", "rejections",
            "service"))])
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert [m["tag"] for m in manifest["services"][0]["models"]] == [model_tag]
    # The Bento's arguments pin the model by full tag and carry params.yaml serve and the image
    # modality's own limits.
    params = load_params(REPO / "params.yaml")
    serve = params.serve
    assert manifest["args"] == {"model_tag": model_tag, "serve": dataclasses.asdict(serve),
                                "limits": dataclasses.asdict(params.image.serve)}
    config = manifest["services"][0]["config"]
    assert config["workers"] == (serve.workers or "cpu_count")
    assert config["logging"]["access"]["enabled"] is serve.access_log
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements
    # The exported folder is the same Bento with the model inside it.
    folder = packaged["export"]
    assert yaml.safe_load((folder / "bento.yaml").read_text())["version"] == version
    assert (folder / "models" / model_tag.replace(":", "/") / "model.onnx").read_bytes() \
        == (stored / "model.onnx").read_bytes()


@pytest.mark.slow
def test_package_infra_validation_goes_through_every_registered_protocol(server):
    """The package stage's report line names the endpoints of every protocol the Bento serves
    (pipeline/serving/protocols.py PROTOCOLS), in the registry's order, and no others: each
    protocol's client, run against the served Bento on the same test images, names its
    endpoints, and the stage printed exactly those. A protocol added to the registry is
    infra-validated without a change to the stage (or to this test)."""
    from pipeline.core.card import BentoArgs, read_card
    from pipeline.core.dataset import split_of
    from pipeline.serving.protocols import PROTOCOLS, Bento, Split

    model_dir = server["model_dir"]
    data = model_dir.parent / "ingested"
    card = read_card(model_dir)
    test = split_of(data, "test", card.preprocessing)
    rows, files, items = test.take(np.arange(len(test)))
    split = Split(rows=rows, files=files, items=items)
    bento = Bento(http=server["client"], grpc_port=server["client"].grpc_port,
                  args=BentoArgs(model_tag=server["report"]["champion"]["model_tag"],
                                 serve=SERVE, limits=IMAGE_LIMITS))
    endpoints = {name: list(answers(bento, card, split)) for name, answers in PROTOCOLS.items()}
    assert set(PROTOCOLS) >= {"rest", "grpc"} and all(endpoints.values()), endpoints
    every = ", ".join(e for named in endpoints.values() for e in named)
    assert f"infra validation ({len(split.rows)} test images through {every})" \
        in server["stdout"], (endpoints, server["stdout"])


@pytest.mark.slow
def test_server_binds_loopback_by_default(server):
    """The Bento carries BENTOML_HOST=0.0.0.0 for its container image (bentofile `envs`): a
    local `bentoml serve` with no --host still listens on loopback only."""
    assert f"listening on http://127.0.0.1:{server['port']}" in server["log"].read_text()


@pytest.mark.slow
@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_classify_matches_local_onnx(server, image_format):
    images, labels = class_images(6, seed=1)
    predictions = []
    for image in images:
        data = encode(image, image_format)
        response = server["client"].post("/classify", files={"image": ("digit.img", data)})
        assert response.status_code == 200, response.text
        pixels = PREPROCESSING.pixels(Image.open(io.BytesIO(data)))[None]
        expected = local_probabilities(server["model_dir"], pixels)[0]
        body = response.json()
        assert body["index"] == int(expected.argmax())
        assert body["label"] == CLASSES[body["index"]]
        assert [body["probabilities"][c] for c in CLASSES] == pytest.approx(expected, abs=1e-6)
        predictions.append(body["index"])
    assert predictions == labels.tolist()  # the tiny model tells the three kinds apart


@pytest.mark.slow
def test_an_image_decoded_off_the_event_loop_gets_the_same_answer(server):
    """Over image.serve.inline_decode_pixels, /classify decodes in a worker thread."""
    side = math.isqrt(IMAGE_LIMITS.inline_decode_pixels) + 1
    images, _ = class_images(3, seed=7)
    for image in images:
        big = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST))
        data = encode(big, "PNG")
        response = server["client"].post("/classify", files={"image": ("big.png", data)})
        assert response.status_code == 200, response.text
        expected = local_probabilities(
            server["model_dir"], PREPROCESSING.pixels(Image.open(io.BytesIO(data)))[None])[0]
        got = response.json()["probabilities"]
        assert [got[c] for c in CLASSES] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_classify_batch_matches_local_onnx(server):
    images, _ = class_images(9, seed=2)
    expected = local_probabilities(server["model_dir"], images[:, None])
    for payload in (images, images[:, None].astype(np.float32)):  # (N, S, S) and (N, C, S, S)
        response = server["client"].post("/classify_batch", json={"images": payload.tolist()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert [p["index"] for p in body] == expected.argmax(axis=1).tolist()
        assert [p["label"] for p in body] == [CLASSES[i] for i in expected.argmax(axis=1)]
        assert np.array([[p["probabilities"][c] for c in CLASSES] for p in body]) \
            == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_classify_batch_concurrent_requests_of_mixed_shapes(server):
    """Adaptive batching concatenates concurrent requests; a bad one must not break the others."""
    requests = []
    for i in range(16):
        images, _ = class_images(1 + i % 4, seed=10 + i)
        requests.append(images if i % 2 else images[:, None])
    bad = np.zeros((2, SIZE + 1, SIZE + 1))

    def post(payload: np.ndarray) -> httpx.Response:
        return server["client"].post("/classify_batch", json={"images": payload.tolist()})

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, [*requests[:8], bad, *requests[8:]]))
    assert responses.pop(8).status_code == 400
    for payload, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        pixels = payload if payload.ndim == 4 else payload[:, None]
        expected = local_probabilities(server["model_dir"], pixels).argmax(axis=1)
        assert [p["index"] for p in response.json()] == expected.tolist()


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@pytest.mark.slow
def test_bad_images_get_400_with_a_message(server):
    rng = np.random.default_rng(0)
    png = encode(rng.integers(0, 256, (64, 64), dtype=np.uint8), "PNG")  # noise: incompressible
    cases = {
        "not an image": (b"this is not an image", "not a PNG, JPEG, WebP, BMP, TIFF or GIF"),
        "truncated PNG": (png[: len(png) // 2], "truncated"),
        "empty file": (b"", "not a PNG, JPEG, WebP, BMP, TIFF or GIF"),
        "an icon": (encode(np.zeros((8, 8), np.uint8), "ICO"), "not a PNG, JPEG, WebP"),
        "animated GIF": (animated_gif(), "image: several frames (an animated GIF)"),
    }
    for case, (data, message) in cases.items():
        response = server["client"].post("/classify", files={"image": ("x.png", data)})
        assert response.status_code == 400, (case, response.text)
        assert message in response.text, (case, response.text)
    response = server["client"].post("/classify", json={})
    assert response.status_code == 415, response.text
    assert "expected multipart/form-data with the file field 'image', got application/json" \
        in response.json()["error"]


@pytest.mark.slow
def test_bad_arrays_get_400_naming_the_expected_shape(server):
    shape = f"(N, {SIZE}, {SIZE}) or (N, 1, {SIZE}, {SIZE})"
    cases = {
        "wrong size": (np.zeros((2, SIZE + 1, SIZE + 1)).tolist(), shape),
        "one image without batch axis": (np.zeros((SIZE, SIZE)).tolist(), shape),
        "three channels": (np.zeros((1, 3, SIZE, SIZE)).tolist(), shape),
        "empty": ([], shape),
        "strings": ([[["a"] * SIZE] * SIZE], "dtype"),
        "ragged": ([[1, 2], [3]], "inhomogeneous"),
        "out of range": (np.full((1, SIZE, SIZE), 256).tolist(), "0..255"),
    }
    for case, (images, message) in cases.items():
        response = server["client"].post("/classify_batch", json={"images": images})
        assert response.status_code == 400, (case, response.text)
        assert message in response.text, (case, response.text)


@pytest.mark.slow
def test_classify_npy_matches_local_onnx(server):
    images, _ = class_images(7, seed=3)
    expected = local_probabilities(server["model_dir"], images[:, None]).argmax(axis=1)
    for payload in (images, images[:, None].astype(np.float32)):  # uint8 (N,S,S), float (N,C,S,S)
        response = server["client"].post("/classify_npy", files={"array": ("x.npy", npy(payload))})
        assert response.status_code == 200, response.text
        assert [p["index"] for p in response.json()] == expected.tolist()


@pytest.mark.slow
def test_bad_npy_gets_400_with_a_message(server):
    cases = {
        "not npy": (b"not a numpy file", "not a readable .npy"),
        "truncated": (npy(np.zeros((4, SIZE, SIZE), np.uint8))[:-10], "not a readable .npy"),
        "pickled objects": (npy(np.array([{"a": 1}], dtype=object)), "got dtype object"),
        "wrong shape": (npy(np.zeros((2, SIZE + 1, SIZE + 1), np.uint8)), "expected shape"),
        "out of range": (npy(np.full((1, SIZE, SIZE), -1.0)), "0..255"),
    }
    for case, (data, message) in cases.items():
        response = server["client"].post("/classify_npy", files={"array": ("x.npy", data)})
        assert response.status_code == 400, (case, response.text)
        assert message in response.text, (case, response.text)


@pytest.mark.slow
def test_oversized_requests_get_413_and_the_server_keeps_serving(server):
    from pipeline.params import load_params

    limit = load_params(REPO / "params.yaml").serve.max_request_bytes
    big = b"\0" * (limit + 1)
    for path, files in (("/classify", {"image": ("x.png", big)}),
                        ("/classify_npy", {"array": ("x.npy", big)})):
        response = server["client"].post(path, files=files)
        assert response.status_code == 413, (path, response.text)
        assert f"limit of {limit} bytes" in response.text
    response = server["client"].post("/classify_batch", content=b"x" * (limit + 1),
                                     headers={"content-type": "application/json"})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the body arrives chunked
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536
    response = server["client"].post("/classify_npy", content=chunks(),
                                     headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413, response.text
    images, _ = class_images(3, seed=4)
    response = server["client"].post("/classify_npy", files={"array": ("x.npy", npy(images))})
    assert response.status_code == 200, response.text


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """A uint8 .npy header claiming `shape`, followed by 64 bytes instead of the pixels."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(64)


def bad_requests(serve) -> dict[str, tuple[str, bytes, str, int, str]]:
    """case -> (path, body, Content-Type, status, message): every input schemathesis or the
    issue found answered with 500, or that costs more than the serve limits allow."""
    side = math.isqrt(IMAGE_LIMITS.max_image_pixels) + 1
    bomb = encode(np.zeros((side, side), np.uint8), "PNG")  # a few KB, > max_image_pixels
    # Over PIL's own limit too, where PIL warns on stderr: the log still gets one line.
    big_side = math.isqrt(Image.MAX_IMAGE_PIXELS) + 1
    big_bomb = encode(np.zeros((big_side, big_side), np.uint8), "PNG")  # ~90 KB
    npz = io.BytesIO()
    np.savez(npz, images=np.zeros((2, SIZE, SIZE), np.uint8))
    too_many = np.zeros((serve.max_batch_items + 1, SIZE, SIZE), np.uint8)
    png = encode(np.zeros((SIZE, SIZE), np.uint8), "PNG")
    form = "multipart/form-data"
    return {
        "no boundary": ("/classify", multipart([("image", "x.png", png)])[0], form, 400,
                        "multipart body without a boundary"),
        "malformed multipart": ("/classify", b"--kiln\r\nno headers", form + "; boundary=kiln",
                                400, "malformed multipart body"),
        "text where a file is expected": ("/classify", *multipart([("image", None, b"http://x/")]),
                                          400, "field 'image' must be a file upload"),
        "wrong field name": ("/classify", *multipart([("file", "x.png", png)]), 400,
                             "field 'image' missing; got 'file'"),
        "extra field": ("/classify_npy", *multipart([("array", "x.npy", npy(too_many[:1])),
                                                     ("note", None, b"hi")]),
                        400, "unexpected field 'note'"),
        "two files": ("/classify", *multipart([("image", "a.png", png), ("image", "b.png", png)]),
                      400, "field 'image': one file expected, got 2"),
        "JSON to an upload endpoint": ("/classify_npy", b"{}", "application/json", 415,
                                       "expected multipart/form-data with the file field 'array', "
                                       "got application/json"),
        "multipart to the JSON endpoint": ("/classify_batch", *multipart([("images", "x", b"[]")]),
                                           415, "expected application/json, got multipart/form-data"),
        "decompression bomb": ("/classify", *multipart([("image", "x.png", bomb)]), 400,
                               f"{side}x{side} = {side * side} pixels, over the limit of "
                               f"{IMAGE_LIMITS.max_image_pixels} pixels"),
        "decompression bomb over PIL's limit": (
            "/classify", *multipart([("image", "x.png", big_bomb)]), 400,
            f"{big_side}x{big_side} = {big_side ** 2} pixels, over the limit"),
        ".npz": ("/classify_npy", *multipart([("array", "x.npy", npz.getvalue())]), 400,
                 "a .npz archive; expected one .npy file"),
        ".npy header claiming 4e9 values": (
            "/classify_npy", *multipart([("array", "x.npy", npy_header_only((62_500_000, 8, 8)))]),
            400, f"holds 4000000000 values; at most {serve.max_batch_items} images per request"),
        ".npy shorter than its header": (
            "/classify_npy", *multipart([("array", "x.npy", npy_header_only((2, 8, 8)))]),
            400, "header says 128 values of 1 bytes; the file holds 64 bytes"),
        "too many images (.npy)": ("/classify_npy", *multipart([("array", "x.npy", npy(too_many))]),
                                   400, f"at most {serve.max_batch_items} images per request"),
        "too many images (JSON)": ("/classify_batch", json.dumps({"images": too_many.tolist()}).encode(),
                                   "application/json", 400,
                                   f"at most {serve.max_batch_items} images per request"),
    }


@pytest.mark.slow
def test_malformed_or_costly_requests_get_4xx_naming_the_cause(server):
    serve = load_params(REPO / "params.yaml").serve
    for case, (path, body, content_type, status, message) in bad_requests(serve).items():
        response = server["client"].post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == status, (case, response.text)
        assert message in response.text, (case, response.text)
    assert server["client"].get("/readyz").status_code == 200
    images, _ = class_images(3, seed=4)
    response = server["client"].post("/classify", files={"image": ("x.png", encode(images[0], "PNG"))})
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_an_upload_over_a_limit_is_refused_from_its_header_before_its_body_arrives(server):
    """Only the first 96 KB of a multipart body declared larger are sent: the 400 must come
    back while the client still owes the rest (an 8 MB body read, spooled and copied before
    the check kept ~100-200 MB per worker under load: docs/benchmarks.md)."""
    serve = load_params(REPO / "params.yaml").serve
    side = math.isqrt(IMAGE_LIMITS.max_image_pixels) + 1
    too_many = np.zeros((serve.max_batch_items * 8, SIZE, SIZE))  # float64: 1 MB at 8x8
    cases = {  # path -> (multipart body, message); the bomb's bytes after IEND pad it to 1 MB
        "/classify": (multipart([("image", "x.png", encode(np.zeros((side, side), np.uint8), "PNG")
                                  + bytes(2**20))]),
                      f"{side}x{side} = {side * side} pixels, over the limit of "
                      f"{IMAGE_LIMITS.max_image_pixels} pixels"),
        "/classify_npy": (multipart([("array", "x.npy", npy(too_many))]),
                          f"holds {too_many.size} values; at most {serve.max_batch_items} images"),
    }
    for path, ((body, content_type), message) in cases.items():
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as client:
            client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           f"{content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                           + body[:96 * 1024])
            answer = b""
            while b"}" not in answer:  # the JSON error body ends the answer
                chunk = client.recv(65536)
                assert chunk, (path, answer)
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), (path, answer)
        assert message in answer.decode(), (path, answer)
    assert server["client"].get("/readyz").status_code == 200


def logged_between_markers(server, send, expected: int) -> tuple[str, list[str]]:
    """The server log's lines for the requests `send()` makes, which should log `expected`
    lines: those after a marker request (a 404 on a made-up path, logged like any rejection),
    once a second marker and as many lines have arrived (the workers' lines reach the file
    asynchronously, in any order between the two workers), and half a second more (a line
    more, if any, would show). Returns (the log from the first marker on, the lines between
    the markers)."""
    marker = uuid.uuid4().hex

    def log_after_marker(until) -> tuple[str, list[str]]:
        deadline = time.monotonic() + 10  # s
        while True:
            text = server["log"].read_text()
            window = text[text.find(f"GET /start-{marker} 404"):] if marker in text else ""
            lines = [line for line in window.splitlines()[1:] if line.strip()]
            if until(window, lines) or time.monotonic() > deadline:
                return window, [line for line in lines if f"/end-{marker}" not in line]
            time.sleep(0.1)

    server["client"].get(f"/start-{marker}")
    log_after_marker(lambda window, _: window)
    send()
    server["client"].get(f"/end-{marker}")
    log_after_marker(lambda window, lines: f"/end-{marker}" in window and len(lines) >= expected + 1)
    time.sleep(0.5)
    return log_after_marker(lambda *_: True)


@pytest.mark.slow
def test_each_rejected_request_is_one_warning_line_without_traceback(server):
    cases = bad_requests(load_params(REPO / "params.yaml").serve)

    def send() -> None:
        for path, body, content_type, _, _ in cases.values():
            server["client"].post(path, content=body, headers={"content-type": content_type})
        server["client"].post("/classify", files={"image": ("x.png", b"not an image")})  # pydantic
        server["client"].post("/classify_npy", files={"array": ("x.npy", b"not npy")})  # in the API

    expected = len(cases) + 2
    window, lines = logged_between_markers(server, send, expected)
    assert "Traceback" not in window and "[ERROR]" not in window, window
    assert len(lines) == expected, window
    assert all("[WARNING]" in line for line in lines), window
    statuses = sorted(int(re.search(r"POST /classify\w* (\d{3}): ", l).group(1)) for l in lines)
    assert statuses == sorted([c[3] for c in cases.values()] + [400, 400]), window
    assert any("field 'image' missing; got 'file'" in l for l in lines), window
    assert any("POST /classify 400: image: not a PNG, JPEG, WebP, BMP, TIFF or GIF file" in l
               for l in lines), window


def error_answers(client: httpx.Client) -> dict[str, tuple[str, str, httpx.Response]]:
    """case -> (method, path, response) for a request refused by each part of the server:
    Kiln's guards (415, 400, 413), pydantic through BentoML (400; BentoML's own shape
    {"error", "detail": [...]}), an InvalidArgument raised in an endpoint (400; BentoML's own
    shape [{"error"}]), another modality's endpoint, and Starlette's 404 and 405 (plain text)."""
    serve = SERVE
    requests = {
        "415 (guard)": ("POST", "/classify", {"json": {}}),
        "400 (guard)": ("POST", "/classify", {"files": {"file": ("x.png", b"x")}}),
        "413 (guard)": ("POST", "/classify_npy",
                        {"files": {"array": ("x.npy", bytes(serve.max_request_bytes + 1))}}),
        "400 (pydantic, a field missing)": ("POST", "/classify_batch", {"json": {}}),
        "400 (pydantic, a check)": ("POST", "/classify_batch", {"json": {"images": [[[300]]]}}),
        "400 (pydantic, not JSON)": ("POST", "/classify_batch",
                                     {"content": b"{", "headers": {"content-type": "application/json"}}),
        "400 (in the endpoint)": ("POST", "/classify_npy", {"files": {"array": ("x.npy", b"no")}}),
        "400 (another modality)": ("POST", "/classify_text", {"json": {"text": "hola"}}),
        "400 (too many images)": ("POST", "/classify_batch", {"json": {"images": np.zeros(
            (serve.max_batch_items + 1, SIZE, SIZE), np.uint8).tolist()}}),
        "404": ("GET", "/no-such-endpoint", {}),
        "405": ("GET", "/classify", {}),
    }
    return {case: (method, path, client.request(method, path, **kwargs))
            for case, (method, path, kwargs) in requests.items()}


@pytest.mark.slow
def test_every_error_answer_is_the_one_json_shape_the_api_page_declares(server):
    """Whoever refuses a request, its answer is {"error": message} and nothing else, as
    application/json; on an operation of /docs.json, with a status declared there whose schema
    it validates against (schemathesis checks the same over generated requests)."""
    import jsonschema

    spec = server["client"].get("/docs.json").json()
    error_schema = spec["components"]["schemas"]["Error"]
    answers = error_answers(server["client"])
    for case, (method, path, response) in answers.items():
        assert response.status_code == int(case[:3]), (case, response.text)
        assert response.headers["content-type"] == "application/json", case
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), (case, body)
        assert body["error"], case
        jsonschema.validate(body, error_schema)
        operation = spec["paths"].get(path, {}).get(method.lower())
        if operation is not None:
            declared = operation["responses"][str(response.status_code)]
            assert declared["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}, case
    assert answers["405"][2].headers["allow"] == "POST"
    # Bytes that are not HTTP at all: uvicorn's own 400, in the same shape.
    took, answer = closed_within(server["port"], b"GARBAGE \x01\r\n\r\n", 0, 10)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"error": "Invalid HTTP request received."}


@pytest.mark.slow
def test_what_a_client_sent_is_quoted_bounded_and_escaped_in_answers_and_logs(server):
    """A path, a multipart field name and a content type as long as a client likes, with
    newlines and an escape sequence in them: each answer's message and each log line is at most
    serve.max_error_chars characters of it (the rest counted), its control characters escaped,
    so every request stays one log line (a newline used to forge a line of its own)."""
    limit = SERVE.max_error_chars
    forged = "\n2026-01-01T00:00:00+0000 [INFO] [cli] forged\x1b[2J"
    long = "x" * 20_000
    png = encode(np.zeros((SIZE, SIZE), np.uint8), "PNG")
    # python-multipart refuses a part header over 8 KiB ("Maximum header size exceeded")
    field = multipart([(f"image{forged}{long[:4000]}", "x.png", png)])
    requests = [
        ("GET", "/" + long + forged.replace("\n", "%0A").replace("\x1b", "%1B"), {}),
        ("POST", "/classify", {"content": field[0], "headers": {"content-type": field[1]}}),
        ("POST", "/classify", {"content": b"{}", "headers": {
            "content-type": f"application/x-{long}{forged.replace(chr(10), ' ').replace(chr(27), '')}"}}),
    ]
    answers = []

    def send() -> None:
        answers.extend(server["client"].request(method, path, **kwargs)
                       for method, path, kwargs in requests)

    window, lines = logged_between_markers(server, send, len(requests))
    assert [a.status_code for a in answers] == [404, 400, 415], [a.text[:300] for a in answers]
    for answer in answers[1:]:  # the 404's message is Starlette's; its path is in the log
        message = answer.json()["error"]
        assert len(message) <= limit + 40 and "more characters)" in message, message[-200:]
        assert message.isprintable(), message
    assert not any(line.startswith("2026-01-01") for line in window.splitlines()), window[-3000:]
    assert len(lines) == len(requests), window[-3000:]
    for line in lines:
        assert "[WARNING]" in line and len(line) <= 2 * (limit + 40) + 400, line[:300]
        assert "\x1b" not in line
    assert any("image\\n2026-01-01" in line for line in lines), lines


@pytest.mark.slow
def test_an_upload_s_file_name_never_reaches_the_filesystem(server):
    """A 245-byte file name (BentoML's file input wrote each upload to a file named after it:
    HTTP 500, File name too long, on every Bento) is only a name: the upload is classified."""
    name = "n" * 241
    images, _ = class_images(2, seed=8)
    answers = {
        "/classify": server["client"].post(
            "/classify", files={"image": (name + ".png", encode(images[0], "PNG"))}),
        "/classify_npy": server["client"].post(
            "/classify_npy", files={"array": (name + ".npy", npy(images))}),
        "/classify_audio": server["client"].post(
            "/classify_audio", files={"audio": (name + ".wav", b"RIFF")}),
    }
    assert answers["/classify"].status_code == 200, answers["/classify"].text
    assert answers["/classify_npy"].status_code == 200, answers["/classify_npy"].text
    assert [p["index"] for p in answers["/classify_npy"].json()] == local_probabilities(
        server["model_dir"], images[:, None]).argmax(axis=1).tolist()
    assert answers["/classify_audio"].status_code == 400  # an image model: refused, by name
    assert "this server serves an image model" in answers["/classify_audio"].json()["error"]


def closed_within(port: int, send: bytes, every_s: float, within_s: float) -> tuple[float, bytes]:
    """Open a connection to 127.0.0.1:port, send `send` one byte each every_s seconds (all at
    once if every_s is 0; nothing if empty), and read until the server closes it: (seconds
    until it did, what it answered). Fails if it is still open after within_s."""
    started = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=within_s) as client:
        client.settimeout(every_s or within_s)
        if not every_s:
            client.sendall(send)
        pending = list(send) if every_s else []
        while time.monotonic() - started < within_s:
            if pending:
                try:
                    client.send(bytes([pending.pop(0)]))
                except OSError:  # closed under us: its answer (if any) is still to be read
                    pending.clear()
            try:
                chunk = client.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return time.monotonic() - started, answer
            answer += chunk
    raise AssertionError(f"the connection is still open after {within_s} s; got {answer!r}")


@pytest.mark.slow
def test_idle_connections_and_trickled_request_heads_are_cut(server):
    """Raw sockets against the server: a connection that sends nothing is closed after
    serve.idle_timeout_s; one that sends its request head a byte a second (slowloris) gets 408
    and is closed serve.header_timeout_s after its first byte. uvicorn alone cut neither."""
    idle_s, head_s = SERVE.idle_timeout_s, SERVE.header_timeout_s
    head = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"y" * 200
    with ThreadPoolExecutor(max_workers=2) as pool:
        idle = pool.submit(closed_within, server["port"], b"", 0, idle_s + 5)
        slow = pool.submit(closed_within, server["port"], head, 1.0, head_s + 5)
        (idle_after, idle_answer), (slow_after, slow_answer) = idle.result(), slow.result()
    assert idle_s - 0.5 <= idle_after <= idle_s + 3 and idle_answer == b"", (idle_after, idle_answer)
    assert head_s - 0.5 <= slow_after <= head_s + 3, slow_after
    status, _, body = slow_answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 "), slow_answer
    assert json.loads(body) == {"error": f"request head (request line and headers) not complete "
                                         f"{head_s:g} s after its first byte"}
    # A request sent at once is answered as before, and the connection kept alive meanwhile.
    took, answer = closed_within(server["port"], b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", 0,
                                 idle_s + 5)
    assert answer.startswith(b"HTTP/1.1 200 ") and took >= idle_s - 0.5, (took, answer)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, tmp_path):
    fuzz_finds_no_server_error(server["client"], server["port"], tmp_path)


@pytest.mark.slow
def test_the_docs_page_draws_every_endpoint_with_no_network(server, tmp_path):
    """GET / in Chromium with the network off: Swagger UI, from BentoML's bundled files, lists
    every endpoint, and the page requests nothing outside the server (BentoML's own page loads
    Google Tag Manager)."""
    page = offline_page(f"http://127.0.0.1:{server['port']}/", tmp_path)
    assert page.requests == []
    for endpoint in ("/classify", "/classify_batch", "/classify_npy"):
        assert f'data-path="{endpoint}"' in page.dom, endpoint


@pytest.mark.slow
def test_the_api_page_describes_the_service_and_its_examples_get_200(server, tmp_path):
    """/docs.json, what Swagger UI on / draws: the bentofile's short description (BentoML's
    default is the project README), the served model's endpoints only (an image model's: the
    text and audio endpoints answer 400), a working example for every JSON endpoint and, for
    every upload, which file to send; and the page, each endpoint opened, shows them."""
    import jsonschema

    spec = server["client"].get("/docs.json").json()
    description = yaml.safe_load((REPO / "bentofile.yaml").read_text())["description"]
    assert spec["info"]["description"] == description
    assert sorted(p for p, item in spec["paths"].items() if "post" in item) == [
        "/classify", "/classify_batch", "/classify_npy"]
    examples, uploads = {}, {}
    for path, item in spec["paths"].items():
        if "post" not in item:
            continue
        assert item["post"]["requestBody"]["required"] is True, path
        ((media_type, body),) = item["post"]["requestBody"]["content"].items()
        fields = body["schema"]["properties"]
        if media_type == "application/json":
            examples[path] = {name: field["example"] for name, field in fields.items()}
            jsonschema.validate(examples[path], body["schema"])  # the example keeps the schema
            response = server["client"].post(path, json=examples[path])
            assert response.status_code == 200, (path, response.text)
        else:
            assert media_type == "multipart/form-data", (path, media_type)
            uploads.update({(path, name): field["description"] for name, field in fields.items()
                            if field.get("format") == "binary"})
    assert list(examples) == ["/classify_batch"]
    assert "a PNG, JPEG, WebP, BMP, TIFF or GIF file" in uploads[("/classify", "image")]
    assert "a .npy file (numpy.save)" in uploads[("/classify_npy", "array")]
    url = f"http://127.0.0.1:{server['port']}/#/Service%20APIs/Classifier__"  # an open endpoint
    page = offline_page(url + "classify_batch", tmp_path)
    shown = re.search(r'<pre class="body-param__example[^>]*>(.*?)</pre>', page.dom, re.S)
    assert shown, "no example body on the page"
    shown_example = json.loads(html.unescape(re.sub(r"<[^>]+>", "", shown[1])))
    assert shown_example == examples["/classify_batch"]
    for (path, _), description in uploads.items():
        page = offline_page(url + path.lstrip("/"), tmp_path)
        assert html.escape(description, quote=False) in page.dom, (path, description)


@pytest.mark.slow
def test_the_text_endpoints_refuse_text_naming_the_image_endpoints(server):
    for path, body in (("/classify_text", {"text": "a text"}),
                       ("/classify_text_batch", {"texts": ["a text"]})):
        response = server["client"].post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        assert "this server serves an image model; send images to /classify" in response.text


@pytest.mark.slow
def test_the_audio_endpoint_refuses_a_recording_naming_the_image_endpoints(server):
    from tests.test_audio_service import audio_file

    wav = audio_file(np.full(1600, 0.25, np.float32), 16000)
    response = server["client"].post("/classify_audio", files={"audio": ("a.wav", wav)})
    assert response.status_code == 400, response.text
    assert "audio: this server serves an image model; send images to /classify" in response.text


@pytest.mark.slow
def test_readiness_and_prometheus_metrics(server):
    assert server["client"].get("/readyz").status_code == 200
    server["client"].post("/classify_npy", files={"array": ("x.npy", npy(class_images(2, 6)[0]))})
    metrics = server["client"].get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'endpoint="/classify_npy"' in metrics.text and "request_total" in metrics.text


@pytest.mark.slow
def test_the_exported_bento_folder_serves_its_own_model_from_an_empty_store(packaged, tmp_path):
    """What a container or a fresh clone does: no model store of its own, only the folder."""
    images, _ = class_images(4, seed=11)
    expected = local_probabilities(packaged["model_dir"], images[:, None])
    empty_home = tmp_path / "empty-bentoml-home"
    with bento_server(str(packaged["export"]), empty_home, tmp_path / "serve.log") as (client, _):
        response = client.post("/classify_npy", files={"array": ("x.npy", npy(images))})
    assert response.status_code == 200, response.text
    got = np.array([[p["probabilities"][c] for c in CLASSES] for p in response.json()])
    assert got == pytest.approx(expected, abs=1e-6)
    assert not any((empty_home / "models").glob("*/*"))  # nothing came from a global store


def copy_with_a_corrupt_model(folder: Path, copy: Path) -> Path:
    """Copy `folder` (an exported Bento or a BentoML home) with one byte of its model.onnx
    flipped; the flipped file's path."""
    import shutil

    shutil.copytree(folder, copy)
    (onnx,) = copy.glob("models/*/*/model.onnx")
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0xFF
    onnx.write_bytes(bytes(data))
    return onnx


@pytest.mark.slow
def test_a_bento_whose_model_file_is_corrupt_does_not_start_and_names_the_file(packaged, tmp_path):
    bento = tmp_path / "bento"
    copy_with_a_corrupt_model(packaged["export"], bento)
    with pytest.raises(StageError, match=r"model\.onnx: sha256 .* does not match"):
        with bento_server(str(bento), tmp_path / "home", tmp_path / "serve.log", ready_timeout_s=60):
            pass


def serve_until_it_stops(bento: str, home: Path, cwd: Path,
                         timeout_s: float = 150) -> tuple[subprocess.CompletedProcess, int, int]:
    """`bentoml serve <bento>` from BentoML home `home`, on free ports, which must exit by itself
    within timeout_s: (the finished process, its HTTP port, its gRPC port)."""
    port, grpc_port = free_ports(2)
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", bento, "--port", str(port)],
        env={**stage_env(home), "KILN_GRPC_PORT": str(grpc_port)}, cwd=cwd,
        capture_output=True, text=True, timeout=timeout_s)
    return done, port, grpc_port


def assert_stopped_for(done: subprocess.CompletedProcess, ports: tuple[int, int],
                       reason: str) -> None:
    """The server exited with cannot_serve.EXIT_CODE, its log gives `reason` as why, its
    workers were not restarted over and over, and nothing listens on its ports."""
    from pipeline.serving.cannot_serve import EXIT_CODE

    output = done.stdout + done.stderr
    assert done.returncode == EXIT_CODE, output[-3000:]
    assert f"cannot serve: {reason}" in output, output[-3000:]
    assert "stopping the server" in output
    workers = SERVE.workers or psutil.cpu_count()
    # Each worker fails once, and a few more may start before the arbiter's next check.
    assert output.count("cannot serve: ") <= 3 * workers, output[-3000:]
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.slow
def test_a_model_file_corrupt_in_the_store_stops_the_server_with_the_reason(packaged, tmp_path):
    """Flipped bytes in the stored model.onnx (the BentoML home's model store, which
    `bentoml serve <tag>` reads): the server used to restart its workers forever (248 times
    in 90 s), its port open and /readyz never answering. Now `bentoml serve` itself exits
    non-zero, its log naming the file and the sha256 mismatch, and its ports are closed."""
    home = tmp_path / "bentoml"
    onnx = copy_with_a_corrupt_model(packaged["home"], home)
    done, *ports = serve_until_it_stops(packaged["report"]["champion"]["bento_tag"], home, tmp_path)
    model_tag = packaged["report"]["champion"]["model_tag"]
    assert_stopped_for(done, ports, f"model {model_tag} cannot be served: {onnx}: sha256 ")
    assert re.search(rf"{re.escape(str(onnx))}: sha256 \w+\.\.\. does not match \w+\.\.\. "
                     rf"recorded in {re.escape(str(onnx.with_name('model.json')))}",
                     done.stdout + done.stderr)


def _card_not_json(folder: Path) -> str:
    (folder / "model.json").write_text("{")
    return f"{folder / 'model.json'}: not valid JSON"


def _onnx_refused(folder: Path) -> str:
    """A model.onnx ONNX Runtime cannot load, whose sha256 the card records (so the card's
    check passes and ONNX Runtime's refusal is what stops the server)."""
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.onnx").write_bytes(b"not an ONNX model" * 100)
    card["weights"]["model.onnx"] = sha256_file(folder / "model.onnx")
    (folder / "model.json").write_text(json.dumps(card))
    return "INVALID_PROTOBUF"


def _classes_not_the_model_s(folder: Path) -> str:
    """A card listing a class more than its model.onnx has logits: the self-check fails."""
    card = json.loads((folder / "model.json").read_text())
    card["classes"].append("extra")
    (folder / "model.json").write_text(json.dumps(card))
    return f"RuntimeError: model.onnx gives logits of shape (1, {len(CLASSES)}) for one input; " \
        f"model.json lists {len(CLASSES) + 1} classes"


@pytest.mark.slow
def test_a_model_that_cannot_load_or_fails_its_self_check_stops_the_server(packaged, tmp_path):
    """A card that does not parse, an ONNX file ONNX Runtime refuses, a model whose logits are
    not the card's classes: each server exits non-zero with the reason (three served side by
    side, to keep the test short)."""
    import shutil

    model_tag = packaged["report"]["champion"]["model_tag"]
    cases = {}
    for break_model in (_card_not_json, _onnx_refused, _classes_not_the_model_s):
        home = tmp_path / break_model.__name__ / "bentoml"
        shutil.copytree(packaged["home"], home)
        (folder,) = home.glob("models/*/*/")
        cases[break_model.__name__] = (home, break_model(folder))
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        served = {case: pool.submit(serve_until_it_stops, packaged["report"]["champion"]["bento_tag"],
                                    home, home.parent)
                  for case, (home, _) in cases.items()}
        for case, (_, reason) in cases.items():
            done, *ports = served[case].result()
            assert_stopped_for(done, ports, f"model {model_tag} cannot be served: ")
            assert reason in done.stdout + done.stderr, (case, (done.stdout + done.stderr)[-3000:])


def test_what_a_client_sent_is_escaped_cut_and_counted():
    from pipeline.serving.rejections import bounded

    assert bounded("field 'image' missing; got 'file'", 100) == "field 'image' missing; got 'file'"
    assert bounded("a\nb\r\x1b[2Jc\u202ed\u2028e\x00", 100) == "a\\nb\\r\\x1b[2Jc\\u202ed\\u2028e\\x00"
    assert bounded("x" * 7_000_000, 10) == "x" * 10 + "... (6999990 more characters)"
    assert bounded("\n" * 50, 9) == "\\n" * 4 + "... (46 more characters)"  # escapes stay whole
    assert bounded("é☔天", 3) == "é☔天"  # printable, whatever the script


def test_the_api_page_lists_the_served_endpoints_with_every_error_in_one_shape():
    """published() on a document shaped as BentoML's: the other modality's endpoint gone, each
    operation's errors in the one Error shape, the JSON field given its schema, the body
    required."""
    from pipeline.serving.api_docs import ENDPOINT_ERRORS, PROBE_ERRORS, published

    bentoml_error = {"content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/InvalidArgument"}}}}
    spec = {"paths": {
        "/readyz": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/classify_batch": {"post": {
            "responses": {"200": {"description": "ok"}, "400": bentoml_error},
            "requestBody": {"content": {"application/json": {"schema": {"properties": {
                "images": {"title": "Images", "description": "pixels", "type": "array",
                           "items": {"type": "number"}}}}}}}}},
        "/classify_text": {"post": {"responses": {"200": {"description": "ok"}}}}},
        "components": {"schemas": {"InvalidArgument": {}, "Prediction": {}}}}
    shape = {"type": "array", "maxItems": 2}
    out = published(spec, {"/classify_batch"}, {"images": shape})
    assert sorted(out["paths"]) == ["/classify_batch", "/readyz"]
    assert sorted(out["components"]["schemas"]) == ["Error", "Prediction"]
    operation = out["paths"]["/classify_batch"]["post"]
    assert sorted(operation["responses"]) == sorted(["200", *ENDPOINT_ERRORS])
    assert sorted(out["paths"]["/readyz"]["get"]["responses"]) == sorted(["200", *PROBE_ERRORS])
    assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    assert operation["requestBody"]["required"] is True
    assert operation["requestBody"]["content"]["application/json"]["schema"]["properties"][
        "images"] == {"title": "Images", "description": "pixels", **shape}
    assert "InvalidArgument" in spec["components"]["schemas"]  # the input is left as it was


class _RequestState:
    """Stands for what a request's context holds (BentoML's OpenTelemetry span)."""


def _context_kept_after_request(middleware_class) -> bool:
    """Run one request through `middleware_class` (a BentoML timeout middleware, 30 s) with a
    context variable set, as BentoML's tracing sets the span, on uvloop as the server does; True
    if what that context held is still alive once the request is done."""
    import asyncio
    import contextvars
    import gc
    import weakref

    import uvloop

    current = contextvars.ContextVar("request_state")

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message):
        pass

    async def request():
        state = _RequestState()
        current.set(state)
        await middleware_class(app, timeout=30)({"type": "http"}, None, send)
        return weakref.ref(state)

    async def main():
        state = await asyncio.create_task(request(), context=contextvars.Context())
        for _ in range(2):  # the loop lets go of the finished task
            await asyncio.sleep(0)
        gc.collect()
        return state() is not None

    return uvloop.run(main())


def test_bentoml_builds_its_request_timeout_without_a_timer_left_per_request():
    """BentoML 1.4's timeout middleware leaves a 30 s timer per request holding the request's
    context (measured: ~80-90 MB per worker under load, docs/benchmarks.md); the service swaps
    in one that cancels it. Checked on the class BentoML's app factory now builds."""
    from types import SimpleNamespace

    from bentoml._internal.server.base_app import BaseAppFactory
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from pipeline.serving.http_guard import cancel_request_timers

    assert _context_kept_after_request(TimeoutMiddleware)  # BentoML's own: the leak is real
    cancel_request_timers()
    (timeout,) = BaseAppFactory.middlewares.fget(SimpleNamespace(timeout=30, max_concurrency=None))
    assert not _context_kept_after_request(timeout.cls)


def _dockerfile_lines(dockerfile: str) -> list[str]:
    """Its instructions, a continued line joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    return [" ".join(line.split()) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# The Dockerfile `bentoml containerize BENTO` hands its builder (BuildKit on, Docker's default).
CONTAINERFILE = """import sys, bentoml
from bentoml._internal.container import construct_containerfile
with construct_containerfile(bentoml.get(sys.argv[1]), enable_buildkit=True) as (_, path):
    print(open(path).read())
"""


@pytest.mark.slow
def test_the_bento_s_image_runs_its_requirements_on_this_python_on_all_interfaces(packaged):
    """The Dockerfile `bentoml containerize` builds (made without a Docker daemon) and the
    Bento's own copy: the Python that made the Bento's pins (bentofile docker.python_version),
    exactly the Bento's requirements.txt, `bentoml serve` on all interfaces with BentoML's
    tracking off, port 3000."""
    done = subprocess.run([sys.executable, "-c", CONTAINERFILE,
                           packaged["report"]["champion"]["bento_tag"]],
                          env=stage_env(packaged["home"]), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for dockerfile in (done.stdout, (packaged["export"] / "env/docker/Dockerfile").read_text()):
        built = _dockerfile_lines(dockerfile)
        assert built[0] == f"FROM python:{python}-slim AS base-container"
        assert any(f"uv venv --python {python} /app/.venv" in line for line in built)
        installs = [line for line in built if re.search(r"\b(pip|uv)\b.* install\b", line)]
        assert len(installs) == 2, installs  # the installer, then the Bento's own pins
        assert installs[0].endswith("|| pip install uv"), installs
        assert installs[1].endswith(" pip install -r $BENTO_PATH/env/python/requirements.txt")
        for name, value in {"BENTOML_HOST": "0.0.0.0", "BENTOML_DO_NOT_TRACK": "True"}.items():
            assert f"ARG {name}={value}" in built and f"ENV {name}=${name}" in built, name
        assert "EXPOSE 3000" in built
        assert built[-1] == 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]'


@pytest.mark.slow
def test_the_bento_serves_from_a_clean_virtualenv_of_its_own_requirements(packaged, tmp_path):
    """What the container image does: a virtualenv with no site packages gets exactly the wheels
    the Bento's requirements.txt pins (`uv pip install` as in its Dockerfile; --no-deps, then
    `uv pip check`, so a requirement missing from the file fails here instead of being pulled
    in), from make install's wheelhouse, inside a network namespace with only loopback: nothing
    is downloaded. Its `bentoml serve` of the exported Bento, with an empty BentoML home and the
    Bento's own envs (BENTOML_HOST=0.0.0.0), listens on all interfaces and answers the test
    images as ONNX Runtime does here."""
    from tests.closed_network import closed_network_missing, leaving, run_closed
    from tests.wheelhouse import WHEELHOUSE

    reason = closed_network_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"no network namespace under strace: {reason}")
    if reason:
        pytest.skip(reason)
    bento = packaged["export"]
    requirements = bento / "env" / "python" / "requirements.txt"
    assert (WHEELHOUSE / "requirements.txt").is_file(), f"{WHEELHOUSE}: missing; run make install"
    stale = set(requirements.read_text().split()) - set(
        (WHEELHOUSE / "requirements.txt").read_text().split())
    assert not stale, f"{WHEELHOUSE} lacks {sorted(stale)}: run make install"
    uv, venv = str(Path(sys.executable).with_name("uv")), tmp_path / "venv"
    python = str(venv / "bin" / "python")
    steps = {
        "venv": [uv, "venv", "-q", "--no-config", "--python", sys.executable, str(venv)],
        "install": [uv, "pip", "install", "-q", "--no-config", "--offline", "--no-index",
                    "--find-links", str(WHEELHOUSE), "--no-deps", "--cache-dir",
                    str(tmp_path / "uv-cache"), "--python", python, "-r", str(requirements)],
    }
    for step, command in steps.items():
        trace = tmp_path / f"{step}.strace"
        done = run_closed(command, trace, timeout_s=180)
        assert done.returncode == 0, (step, done.stderr[-3000:])
        assert not leaving(trace), (step, leaving(trace))
    done = subprocess.run([uv, "pip", "check", "--no-config", "--python", python],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    envs = {env["name"]: env["value"] for env in manifest["envs"]}
    assert envs == {"BENTOML_HOST": "0.0.0.0", "BENTOML_DO_NOT_TRACK": "True"}
    env = {**os.environ, **envs, "BENTOML_HOME": str(tmp_path / "home")}
    log = tmp_path / "serve.log"
    images, labels = class_images(6, seed=12)
    expected = local_probabilities(packaged["model_dir"], images[:, None])
    with serving(str(bento), log, 60, env=env, host=None, python=python) as client:
        answers = [client.post("/classify", files={"image": ("x.png", encode(image, "PNG"))})
                   for image in images]
        answers.append(client.post("/classify_npy", files={"array": ("x.npy", npy(images))}))
        listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == client.base_url.port}
    assert listening == {"0.0.0.0"}, listening
    assert [a.status_code for a in answers] == [200] * 7, [a.text for a in answers]
    got = [a.json() for a in answers[:-1]] + answers[-1].json()
    assert np.array([[p["probabilities"][c] for c in CLASSES] for p in got]) \
        == pytest.approx(np.vstack([expected, expected]), abs=1e-6)
    assert [p["label"] for p in got] == [CLASSES[i] for i in labels] * 2
