"""Serving a text model: `python -m pipeline.stages package` on a tiny text model (a BPE
tokenizer trained here, embedding mean + linear exported to ONNX with the contract's signature:
`input_ids` int64 [N, L] -> `logits` [N, K]), its infra validation through the text endpoints
and gRPC, then the Bento under `bentoml serve`, checked as a client sees it: answers equal ONNX
Runtime's on the same tokens, a batch equals its singles, bad texts and the image endpoints get
400 naming the cause, gRPC's BYTES input answers as REST does."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from open_inference.grpc import protocol as pb
from open_inference.grpc.service import GRPCInferenceServiceStub

from pipeline.core.dataset import write_items
from pipeline.serving import oip
from pipeline.core.card import (ModelCard, Recipe, Selection, ValScore, read_card, sha256_file, softmax,
                           write_card)
from pipeline.params import load_params, recipe_section
from pipeline.modalities.text import infra, preprocess as tokens
from tests.bento_server import bento_server, fuzz_finds_no_server_error
from tests.tiny_bento import REPO, encode, fit_and_export, npy, run_package

SERVE = load_params(REPO / "params.yaml").serve
LIMITS = load_params(REPO / "params.yaml").text.serve  # the text model's own
# Per-class vocabularies: a text's words come from its class's list (plus shared filler).
WORDS = {"weather": "rain sun cloud wind storm snow forecast cold warm humid".split(),
         "sport": "goal match team score player coach league ball win referee".split(),
         "food": "bread cheese soup spice recipe bake salad pasta fruit dinner".split()}
CLASSES = list(WORDS)
FILLER = "the a and of today very".split()


def class_texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n short texts, classes in turn, each 3-12 words mostly from its class's vocabulary."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    texts = []
    for label in labels:
        words = WORDS[CLASSES[label]]
        picked = [rng.choice(words if rng.random() < 0.7 else FILLER)
                  for _ in range(rng.integers(3, 13))]
        texts.append(" ".join(picked).capitalize() + ".")
    return texts, labels


def write_tiny_text_model(folder: Path, steps: int = 60, seed: int = 0,
                          encoder: bool = False) -> None:
    """A tokenizer trained on class_texts, an embedding-mean + linear model (padding masked)
    trained for `steps` Adam steps, exported as the contract's model.onnx, and its card.
    encoder: a BERT-style encoder of params.yaml text's size (dim, layers, heads, ffn) between
    the embedding (plus learned positions) and the mean, so that bench/serve_bench.py's text
    mode times a model as costly as the real text_encoder."""
    import torch

    params = load_params(REPO / "params.yaml")
    folder.mkdir(parents=True)
    texts, labels = class_texts(150, seed=1)
    tokenizer = tokens.train_tokenizer(texts, vocab_size=200, lowercase=True)
    prep = tokens.save(tokenizer, folder, max_tokens=params.text.preprocess.max_tokens, lowercase=True)
    t = params.text
    dim = t.dim if encoder else 8

    class EmbeddingMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(prep.vocab_size, dim)
            self.head = torch.nn.Linear(dim, len(CLASSES))
            if encoder:
                self.positions = torch.nn.Embedding(prep.max_tokens, dim)
                layer = torch.nn.TransformerEncoderLayer(dim, t.heads, t.ffn, dropout=0.0,
                                                         batch_first=True)
                self.encoder = torch.nn.TransformerEncoder(layer, t.layers,
                                                           enable_nested_tensor=False)

        def forward(self, input_ids):
            pad = input_ids == prep.pad_id
            x = self.embed(input_ids)
            if encoder:
                x = x + self.positions(torch.arange(input_ids.shape[1]))[None]
                x = self.encoder(x, src_key_padding_mask=pad)
            mask = (~pad).unsqueeze(-1).float()
            return self.head((x * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    torch.manual_seed(seed)
    net = EmbeddingMean()
    x = torch.from_numpy(tokens.encode(tokenizer, texts, prep))
    fit_and_export(net, x, torch.from_numpy(labels), steps, 0.1, folder / "model.onnx",
                   "input_ids", {1: torch.export.Dim("tokens", max=prep.max_tokens)})
    data = dataclasses.replace(params.data, modality="text")
    write_card(folder, ModelCard(
        architecture="text_encoder" if encoder else "text_bag", classes=CLASSES, preprocessing=prep, data_hash="0" * 64,
        recipe=Recipe(data=data, train=params.train, compress=params.compress,
                      section=recipe_section(params, "text")),
        weights={"model.onnx": sha256_file(folder / "model.onnx")},
        val=ValScore(loss=0.1, accuracy=1.0),
        selection=Selection(variant="float_onnx", accuracy=1.0, macro_f1=1.0, size_bytes=7000,
                            macs=1000, params=100)))


def write_ingested_texts(folder: Path, n: int, seed: int) -> list[str]:
    """An ingested text folder as the ingest stage writes it (the data contract), with a test
    split of n class_texts; returns the texts in shard order."""
    texts, labels = class_texts(n, seed)
    write_items(folder, (({"id": f"texts/test/{CLASSES[label]}/{i:04d}.txt",
                           "label": CLASSES[label], "split": "test"}, text.encode("utf-8"))
                         for i, (text, label) in enumerate(zip(texts, labels))), CLASSES)
    return texts


def local_probabilities(model_dir: Path, texts: list[str]) -> np.ndarray:
    """What the server should answer: the same tokenizer and ONNX file, run here."""
    prep = read_card(model_dir).preprocessing
    ids = tokens.encode(tokens.load(model_dir, prep), texts, prep)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return softmax(session.run(["logits"], {"input_ids": ids})[0])


def served_probabilities(answers: list[dict]) -> np.ndarray:
    return np.array([[a["probabilities"][c] for c in CLASSES] for a in answers])


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    """The package stage (infra validation included) on the tiny text model, then its Bento
    under `bentoml serve` on free loopback ports, with a gRPC channel to it."""
    root = tmp_path_factory.mktemp("text_package")
    write_tiny_text_model(root / "selected")
    texts = write_ingested_texts(root / "ingested", 24, seed=7)
    done, report = run_package(root / "selected", root / "ingested", root / "bentoml")
    assert done.returncode == 0, done.stderr[-3000:]
    with bento_server(report["champion"]["bento_tag"], root / "bentoml", root / "serve.log") as (
            client, port):
        with grpc.insecure_channel(f"127.0.0.1:{client.grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            yield {"client": client, "port": port, "stub": GRPCInferenceServiceStub(channel),
                   "model_dir": root / "selected", "texts": texts, "report": report,
                   "stdout": done.stdout, "log": root / "serve.log", "home": root / "bentoml",
                   "model": report["champion"]["model_tag"].split(":")[0]}


# Texts with no character a font draws, which the model classified (p=0.87) as if they were
# words: control characters, zero-width space / joiners / BOM, bidi and word-joiner marks, a
# lone combining accent, Hangul fillers (letters that draw nothing), a private-use character.
INVISIBLE_TEXTS = ["\x00\x07\x1b", "\u200b\u200c\u200d\ufeff", "\u202e\u2060 \u2066",
                   "\u0301", "\u3164\u115f\uffa0", "\ue000", "\u200b \x00\n\u3000"]
SAMPLES = ["Rain and cold wind today.", "The team won the match!", "Bake bread, then soup.",
           "Ünïcödé: ☔ 天气 — rain?", "x" * 2000]  # the last: far over max_tokens, cut


@pytest.mark.slow
def test_the_package_stage_infra_validates_a_text_bento_through_rest_and_grpc(text_server):
    report = text_server["report"]
    assert report["challenger_serves"] is True and report["challenger"]["accuracy"] > 0.9
    assert ("infra validation (24 test texts through /classify_text_batch, /classify_text, "
            "gRPC ModelInfer)") in text_server["stdout"]


@pytest.mark.slow
def test_a_text_bento_that_answers_otherwise_is_not_promoted(text_server, tmp_path):
    """Infra validation compares the served answers with the evaluated model's: a server that
    tokenizes each text reversed runs and answers, wrongly, and the stage fails; the champion
    stays and the failed Bento is deleted."""
    from tests.test_promotion import broken_build_context

    home = text_server["home"]
    bentos = sorted(p.name for p in (home / "bentos" / "kiln").iterdir())
    bentofile = broken_build_context(tmp_path / "ctx", (
        "return softmax(predict(self.model_input(batch)))",
        "return softmax(predict(self.model_input([t[::-1] for t in batch])))"))
    model_dir = text_server["model_dir"]
    done, report = run_package(model_dir, model_dir.parent / "ingested", home, bentofile)
    assert done.returncode == 1 and report is None, done.stdout
    assert "/classify_text_batch of kiln:" in done.stderr
    assert "differs from the evaluated model" in done.stderr
    assert sorted(p.name for p in (home / "bentos" / "kiln").iterdir()) == bentos


@pytest.mark.slow
def test_classify_text_answers_as_onnx_runtime_on_the_same_tokens(text_server):
    client = text_server["client"]
    expected = local_probabilities(text_server["model_dir"], SAMPLES)
    answers = []
    for text in SAMPLES:
        response = client.post("/classify_text", json={"text": text})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    np.testing.assert_allclose(served_probabilities(answers), expected, atol=1e-6)
    assert [a["index"] for a in answers] == expected.argmax(1).tolist()
    assert [a["label"] for a in answers] == [CLASSES[i] for i in expected.argmax(1)]
    assert [a["label"] for a in answers[:3]] == ["weather", "sport", "food"]


@pytest.mark.slow
def test_a_batch_answers_as_its_texts_one_by_one(text_server):
    client, texts = text_server["client"], text_server["texts"][:10] + SAMPLES
    response = client.post("/classify_text_batch", json={"texts": texts})
    assert response.status_code == 200, response.text
    batch = response.json()
    singles = [client.post("/classify_text", json={"text": t}).json() for t in texts]
    assert [a["label"] for a in batch] == [a["label"] for a in singles]
    np.testing.assert_allclose(served_probabilities(batch), served_probabilities(singles),
                               atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("path, body, message", [
    ("/classify_text", {"text": ""}, "text: empty"),
    ("/classify_text", {"text": " \t\n "}, "text: whitespace only"),
    *[("/classify_text", {"text": text}, "text: no visible character")
      for text in INVISIBLE_TEXTS],
    ("/classify_text", {"text": "é" * (LIMITS.max_text_bytes // 2 + 1)},
     f"text: {LIMITS.max_text_bytes + 2} UTF-8 bytes, over the limit of {LIMITS.max_text_bytes}"),
    ("/classify_text", {"text": 5}, "Input should be a valid string"),
    ("/classify_text", {}, "Field required"),
    ("/classify_text_batch", {"texts": []}, "texts: no texts"),
    ("/classify_text_batch", {"texts": ["goal", "  "]}, "texts[1]: whitespace only"),
    ("/classify_text_batch", {"texts": ["goal", "\u200b\u2060"]}, "texts[1]: no visible character"),
    ("/classify_text_batch", {"texts": ["goal"] * (SERVE.max_batch_items + 1)},
     f"texts: {SERVE.max_batch_items + 1} texts; at most {SERVE.max_batch_items}"),
    ("/classify_batch", {"images": [[[0]]]}, "images: this server serves a text model"),
])
def test_bad_texts_and_image_input_get_400_naming_the_cause(text_server, path, body, message):
    response = text_server["client"].post(path, json=body)
    assert response.status_code == 400, response.text
    assert message in response.text


@pytest.mark.slow
@pytest.mark.parametrize("body, message", [
    (b'{"text": "\xff\xfe rain"}', "Invalid JSON: invalid unicode code point"),  # not UTF-8
    (b'{"text": "\\ud800 rain"}', "Invalid JSON"),  # an unpaired surrogate escape
    (b'{"text": "rain', "Invalid JSON: EOF"),
])
def test_a_body_that_is_not_utf8_json_gets_400(text_server, body, message):
    response = text_server["client"].post("/classify_text", content=body,
                                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


@pytest.mark.slow
def test_the_image_endpoints_refuse_a_valid_image_naming_the_text_endpoints(text_server):
    client = text_server["client"]
    pixels = np.zeros((1, 8, 8), np.uint8)
    for path, files in (("/classify", {"image": ("a.png", encode(pixels[0], "PNG"))}),
                        ("/classify_npy", {"array": ("a.npy", npy(pixels))})):
        response = client.post(path, files=files)
        assert response.status_code == 400, (path, response.text)
        assert "this server serves a text model" in response.text
        assert "/classify_text" in response.text
    assert client.get("/readyz").status_code == 200


@pytest.mark.slow
def test_the_audio_endpoint_refuses_a_recording_naming_the_text_endpoints(text_server):
    from tests.test_audio_service import audio_file

    wav = audio_file(np.full(1600, 0.25, np.float32), 16000)
    response = text_server["client"].post("/classify_audio", files={"audio": ("a.wav", wav)})
    assert response.status_code == 400, response.text
    assert "audio: this server serves a text model; send" in response.text, response.text
    assert "to /classify_text or" in response.text, response.text


@pytest.mark.slow
def test_the_api_page_gives_working_text_examples(text_server):
    spec = text_server["client"].get("/docs.json").json()
    examples = {}
    for path, item in spec["paths"].items():
        if "post" not in item:
            continue
        ((media_type, body),) = item["post"]["requestBody"]["content"].items()
        fields = body["schema"]["properties"]
        if media_type == "application/json" and all("example" in f for f in fields.values()):
            examples[path] = {name: field["example"] for name, field in fields.items()}
    assert sorted(examples) == ["/classify_text", "/classify_text_batch"]
    for path, example in examples.items():
        response = text_server["client"].post(path, json=example)
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize("text, visible", [
    *[(text, False) for text in INVISIBLE_TEXTS],
    ("", False), (" \t\n\u3000\u00a0", False), ("\u2800", True),  # braille blank: a symbol
    ("goal", True), ("\u200b\u200bé", True), ("\x00\u3164 7", True), ("天", True),
    ("\u2603", True), ("\U0001F600", True), ("\u200b" * 100_000 + "!", True),
])
def test_a_visible_character_is_a_letter_number_punctuation_mark_or_symbol(text, visible):
    from pipeline.modalities.text.serving import has_visible_character

    assert has_visible_character(text) is visible


def text_request(model: str, texts: list[bytes], raw: bool = True, datatype: str = "BYTES",
                 shape: list[int] | None = None, name: str = "texts") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype,
                                shape=[len(texts)] if shape is None else shape)
    if raw:
        request.raw_input_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in texts))
    else:
        tensor.contents.bytes_contents.extend(texts)
    return request


@pytest.mark.slow
def test_grpc_metadata_advertises_the_bytes_input(text_server):
    metadata = text_server["stub"].ModelMetadata(pb.ModelMetadataRequest(name=text_server["model"]))
    (tensor,) = metadata.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("texts", "BYTES", [-1])
    assert metadata.properties["input_datatypes"] == "BYTES"
    assert json.loads(metadata.properties["classes"]) == CLASSES


@pytest.mark.slow
def test_grpc_bytes_infer_answers_as_rest_does(text_server):
    stub, model, client = text_server["stub"], text_server["model"], text_server["client"]
    rest = client.post("/classify_text_batch", json={"texts": SAMPLES}).json()
    encoded = [t.encode("utf-8") for t in SAMPLES]
    for raw in (True, False):
        response = stub.ModelInfer(text_request(model, encoded, raw=raw), timeout=10)
        outputs = {o.name: o for o in response.outputs}
        probabilities = np.array(outputs["probabilities"].contents.fp32_contents).reshape(
            list(outputs["probabilities"].shape))
        np.testing.assert_allclose(probabilities, served_probabilities(rest), atol=1e-6)
        assert [b.decode() for b in outputs["label"].contents.bytes_contents] == [
            a["label"] for a in rest]
        assert list(outputs["index"].contents.int64_contents) == [a["index"] for a in rest]
    # One text, as the package stage and bench/serve_bench.py send it.
    name, version = text_server["report"]["champion"]["model_tag"].split(":")
    one = stub.ModelInfer(infra.infer_request(name, version, SAMPLES[:1]), timeout=10)
    np.testing.assert_allclose(oip.probabilities_of(one), served_probabilities(rest[:1]),
                               atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, message", [
    ({"texts": [b""]}, "texts[0]: empty"),
    ({"texts": [b"goal", b" \n"]}, "texts[1]: whitespace only"),
    *[({"texts": [b"goal", text.encode()], "raw": raw}, "texts[1]: no visible character")
      for text in INVISIBLE_TEXTS for raw in (True, False)],
    ({"texts": [b"\xff\xfe rain"]}, "texts[0]: not valid UTF-8"),
    ({"texts": [b"e" * (LIMITS.max_text_bytes + 1)]}, "over the limit of"),
    ({"texts": [b"goal"] * (SERVE.max_batch_items + 1)}, "at most"),
    ({"texts": [b"goal"], "datatype": "UINT8"}, "datatype 'UINT8' not accepted"),
    ({"texts": [b"goal"], "shape": [1, 1]}, "expected [N]"),
    ({"texts": [b"goal"], "shape": [2]}, "holds 1 elements"),
    ({"texts": [b"goal"], "raw": False, "shape": [3]}, "contents.bytes_contents holds 1"),
    ({"texts": [b"goal"], "name": "images"}, "this server serves a text model"),
])
def test_grpc_bad_texts_get_invalid_argument_naming_the_cause(text_server, kwargs, message):
    with pytest.raises(grpc.RpcError) as caught:
        text_server["stub"].ModelInfer(text_request(text_server["model"], **kwargs), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


@pytest.mark.slow
def test_a_truncated_bytes_element_gets_invalid_argument(text_server):
    request = text_request(text_server["model"], [b"goal"])
    request.raw_input_contents[0] = (100).to_bytes(4, "little") + b"goal"
    with pytest.raises(grpc.RpcError) as caught:
        text_server["stub"].ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "element 0 says 100 bytes; 4 remain" in caught.value.details()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_on_a_text_model(text_server, tmp_path):
    fuzz_finds_no_server_error(text_server["client"], text_server["port"], tmp_path)


@pytest.mark.slow
def test_a_text_with_one_visible_character_among_invisible_ones_is_classified(text_server):
    """The check looks for any drawn character, not only the first (one numpy lookup over a
    text's code points)."""
    client = text_server["client"]
    for text in ("\u200b\u200b goal", "\x00\u3164 rain", "\u0301é"):
        response = client.post("/classify_text", json={"text": text})
        assert response.status_code == 200, (text, response.text)


@pytest.mark.slow
def test_an_upload_s_long_file_name_is_refused_by_the_endpoint_not_the_filesystem(text_server):
    """A 245-byte file name on /classify_npy got HTTP 500 (File name too long) on a text Bento
    too; now it gets the endpoint's own answer for a text model."""
    response = text_server["client"].post(
        "/classify_npy", files={"array": ("n" * 241 + ".npy", npy(np.zeros((1, 8, 8), np.uint8)))})
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "array: this server serves a text model; send "
                                        "{\"text\": ...} to /classify_text or {\"texts\": [...]} "
                                        "to /classify_text_batch"}


@pytest.mark.slow
def test_two_million_empty_texts_are_refused_by_their_count_without_holding_the_loop(text_server):
    """One 8 MB ModelInfer of 2,000,000 empty texts (raw BYTES: a 4-byte length each) held a
    worker's event loop 3.2-5.9 s while they were split, before the 256-text limit was checked.
    Its count is now checked from the shape first: ServerLive calls on the same channel (the
    same connection, so the same worker) keep answering while it is refused."""
    import threading

    n = 2_000_000
    channel = grpc.insecure_channel(f"127.0.0.1:{text_server['client'].grpc_port}",
                                    options=[("grpc.max_send_message_length", 16 << 20)])
    stub = GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name=text_server["model"])
    request.inputs.add(name="texts", datatype="BYTES", shape=[n])
    request.raw_input_contents.append(b"\0\0\0\0" * n)
    assert request.ByteSize() <= SERVE.max_request_bytes
    stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # the connection is up
    refused, latencies = {}, []

    def infer() -> None:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=60)
        refused["status"] = (caught.value.code(), caught.value.details())

    with channel:
        flood = threading.Thread(target=infer)
        flood.start()
        while flood.is_alive() or len(latencies) < 3:
            started = time.perf_counter()
            stub.ServerLive(pb.ServerLiveRequest(), timeout=30)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        flood.join()
    assert refused["status"] == (grpc.StatusCode.INVALID_ARGUMENT,
                                 f"texts: {n} texts; at most {SERVE.max_batch_items} texts per request")
    # s: 3.2-5.9 before; ~0.05 measured on a loaded 2-core machine, the message's transfer
    # and protobuf parse included
    assert max(latencies) < 1.0, latencies
