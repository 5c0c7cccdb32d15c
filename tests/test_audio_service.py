"""Serving an audio model: `python -m pipeline.stages package` on a tiny audio model (a strided Conv1d
over the raw waveform, log energy, mean, linear, exported to ONNX with the contract's signature:
`waveform` float32 [N, clip_samples] -> `logits` [N, K]), its infra validation through
/classify_audio and gRPC, then the Bento under `bentoml serve`, checked as a client sees it:
answers equal ONNX Runtime's on the same files decoded here (WAV, FLAC, Ogg; any rate and channel
count), gRPC's FP32 waveform answers as REST does, and bad recordings, bad waveforms and the
other modalities' endpoints get 400 / INVALID_ARGUMENT naming the cause."""
from __future__ import annotations

import dataclasses
import io
import json
import socket
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import soundfile
from open_inference.grpc import protocol as pb
from open_inference.grpc.service import GRPCInferenceServiceStub

from pipeline.core.dataset import write_items
from pipeline.serving import oip
from pipeline.modalities.audio import infra
from pipeline.modalities.audio.decode import clip_length, fit
from pipeline.modalities.audio.preprocess import AudioPreprocessing
from pipeline.core.card import ModelCard, Recipe, Selection, ValScore, sha256_file, softmax, write_card
from pipeline.params import load_params, recipe_section
from tests.bento_server import bento_server, fuzz_finds_no_server_error, multipart
from tests.tiny_bento import REPO, encode, fit_and_export, npy, run_package

PARAMS = load_params(REPO / "params.yaml")
SERVE = PARAMS.serve
LIMITS = PARAMS.audio.serve  # the audio model's own
PREP = AudioPreprocessing(sample_rate=PARAMS.audio.preprocess.sample_rate,
                          clip_samples=clip_length(PARAMS.audio.preprocess.sample_rate,
                                                   PARAMS.audio.preprocess.clip_seconds))
TONES = {"low": 300.0, "mid": 1200.0, "high": 4000.0}  # Hz: each class is a tone
CLASSES = list(TONES)
# How the test split's files are written, in turn: (container, subtype, rate Hz, channels)
FORMATS = [("WAV", "PCM_16", 16000, 1), ("WAV", "PCM_U8", 22050, 2), ("FLAC", "PCM_24", 44100, 1),
           ("OGG", "VORBIS", 16000, 1), ("WAV", "FLOAT", 48000, 2),
           ("MP3", "MPEG_LAYER_III", 22050, 1)]
SUFFIX = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3"}


def tone(label: int, rng: np.random.Generator, rate: int, seconds: float) -> np.ndarray:
    """float32 (n,): class `label`'s tone, its pitch within 5%, a random level and phase, a
    little noise."""
    t = np.arange(round(rate * seconds)) / rate
    hz = TONES[CLASSES[label]] * rng.uniform(0.95, 1.05)
    wave = rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    return (wave + rng.normal(0, 0.005, t.size)).astype(np.float32)


def audio_file(samples: np.ndarray, rate: int, channels: int = 1, container: str = "WAV",
               subtype: str = "PCM_16") -> bytes:
    """Mono `samples` written as a file (the same signal in every channel)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.repeat(samples[:, None], channels, axis=1), rate,
                    format=container, subtype=subtype)
    return buffer.getvalue()


def write_tiny_audio_model(folder: Path, steps: int = 40, seed: int = 0) -> None:
    """A strided Conv1d (25 ms windows, 10 ms hop at 16 kHz) over the waveform, log(1 + energy)
    averaged over time, a linear head; trained for `steps` Adam steps on tones, exported as the
    contract's model.onnx, and its card."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = np.arange(60) % len(CLASSES)
    clips = np.stack([fit(tone(y, rng, PREP.sample_rate, rng.uniform(0.3, 1.0)),
                          PREP.clip_samples) for y in labels])

    class TinyAudio(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frames = torch.nn.Conv1d(1, 8, kernel_size=400, stride=160)
            self.head = torch.nn.Linear(8, len(CLASSES))

        def forward(self, waveform):
            energy = self.frames(waveform[:, None]).square()
            return self.head(torch.log1p(energy).mean(-1))

    net = TinyAudio()
    folder.mkdir(parents=True)
    fit_and_export(net, torch.from_numpy(clips), torch.from_numpy(labels), steps, 0.02,
                   folder / "model.onnx", "waveform")
    data = dataclasses.replace(PARAMS.data, modality="audio")
    write_card(folder, ModelCard(
        architecture="tiny_audio", classes=CLASSES, preprocessing=PREP, data_hash="0" * 64,
        recipe=Recipe(data=data, train=PARAMS.train, compress=PARAMS.compress,
                      section=recipe_section(PARAMS, "audio")),
        weights={"model.onnx": sha256_file(folder / "model.onnx")},
        val=ValScore(loss=0.1, accuracy=1.0),
        selection=Selection(variant="float_onnx", accuracy=1.0, macro_f1=1.0, size_bytes=20000,
                            macs=60000, params=3300)))


def write_ingested_clips(folder: Path, n: int, seed: int, formats=FORMATS,
                         seconds: tuple[float, float] = (0.4, 1.0)) -> list[tuple[dict, bytes]]:
    """An ingested audio folder as the ingest stage writes it (the data contract), with a test
    split of n tones, each written in the next of `formats`; returns the items (row, file
    bytes) in shard order."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % len(CLASSES)
        container, subtype, rate, channels = formats[i % len(formats)]
        items.append(({"id": f"audio/test/{CLASSES[label]}/{i:04d}{SUFFIX[container]}",
                       "label": CLASSES[label], "split": "test"},
                      audio_file(tone(label, rng, rate, rng.uniform(*seconds)), rate, channels,
                                 container, subtype)))
    write_items(folder, items, CLASSES)
    return items


def local_probabilities(model_dir: Path, waveforms: np.ndarray) -> np.ndarray:
    """What the server should answer: the same ONNX file, run here."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return softmax(session.run(["logits"], {"waveform": waveforms})[0])


def served_probabilities(answers: list[dict]) -> np.ndarray:
    return np.array([[a["probabilities"][c] for c in CLASSES] for a in answers])


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory):
    """The package stage (infra validation included) on the tiny audio model, then its Bento
    under `bentoml serve` on free loopback ports, with a gRPC channel to it."""
    root = tmp_path_factory.mktemp("audio_package")
    write_tiny_audio_model(root / "selected")
    # the test split's files as a client uploads them: (name, bytes, label)
    files = [(Path(row["id"]).name, data, row["label"])
             for row, data in write_ingested_clips(root / "ingested", 15, seed=7)]
    done, report = run_package(root / "selected", root / "ingested", root / "bentoml")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with bento_server(report["champion"]["bento_tag"], root / "bentoml", root / "serve.log") as (
            client, port):
        with grpc.insecure_channel(f"127.0.0.1:{client.grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            yield {"client": client, "port": port, "stub": GRPCInferenceServiceStub(channel),
                   "model_dir": root / "selected", "files": files, "report": report,
                   "stdout": done.stdout, "log": root / "serve.log",
                   "model": report["champion"]["model_tag"].split(":")[0]}


@pytest.mark.slow
def test_the_package_stage_infra_validates_an_audio_bento_through_rest_and_grpc(audio_server):
    report = audio_server["report"]
    assert report["challenger_serves"] is True and report["challenger"]["accuracy"] > 0.9
    assert ("infra validation (15 test clips through /classify_audio, gRPC ModelInfer)"
            in audio_server["stdout"]), audio_server["stdout"]


def post_audio(client, name: str, data: bytes):
    return client.post("/classify_audio", files={"audio": (name, data)})


@pytest.mark.slow
def test_classify_audio_answers_as_onnx_runtime_on_the_same_decoded_clips(audio_server):
    """Every test file (WAV, FLAC, Ogg and MP3 in six sample formats, 16-48 kHz, mono and
    stereo), a 3 s recording (the model hears its centre second) and a phone's M4A (AAC, decoded
    by FFmpeg through PyAV inside the Bento)."""
    from tests.test_formats import aac_file

    client, files = audio_server["client"], audio_server["files"]
    rng = np.random.default_rng(3)
    long_one = audio_file(tone(2, rng, 22050, 3.0), 22050)
    phone = aac_file(tone(0, rng, 44100, 0.8), 44100)
    uploads = [(name, data) for name, data, _ in files] + [("long.wav", long_one),
                                                           ("memo.m4a", phone)]
    expected = local_probabilities(audio_server["model_dir"],
                                   np.stack([PREP.load(data, name) for name, data in uploads]))
    answers = []
    for name, data in uploads:
        response = post_audio(client, name, data)
        assert response.status_code == 200, (name, response.text)
        answers.append(response.json())
    np.testing.assert_allclose(served_probabilities(answers), expected, atol=1e-6)
    assert [a["index"] for a in answers] == expected.argmax(1).tolist()
    assert [a["label"] for a in answers] == [label for *_, label in files] + ["high", "low"]


@pytest.mark.slow
def test_an_upload_s_long_file_name_never_reaches_the_filesystem(audio_server):
    """245-byte file names (BentoML's file input wrote each upload to a file named after it:
    HTTP 500, File name too long): a recording is classified as under a short name, and
    /classify_npy gives its answer for an audio model."""
    client, ((first, data, _), *_) = audio_server["client"], audio_server["files"]
    suffix = Path(first).suffix
    long_name = "n" * (245 - len(suffix)) + suffix
    short, long = (post_audio(client, name, data) for name in (first, long_name))
    assert long.status_code == 200, long.text
    assert long.json() == short.json()
    response = client.post("/classify_npy", files={"array": ("n" * 241 + ".npy", b"\x93NUMPY")})
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "array: this server serves an audio model; send a WAV, "
                                        "FLAC, Ogg, MP3, M4A or AAC file to /classify_audio"}


def waveform_request(model: str, values: np.ndarray, raw: bool = True, datatype: str = "FP32",
                     shape: list[int] | None = None, name: str = "waveform") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype,
                                shape=list(values.shape) if shape is None else shape)
    if raw:
        request.raw_input_contents.append(values.tobytes())
    else:
        tensor.contents.fp32_contents.extend(values.ravel().tolist())
    return request


@pytest.mark.slow
def test_grpc_metadata_advertises_the_waveform_input(audio_server):
    metadata = audio_server["stub"].ModelMetadata(pb.ModelMetadataRequest(name=audio_server["model"]))
    (tensor,) = metadata.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == (
        "waveform", "FP32", [-1, PREP.clip_samples])
    assert json.loads(metadata.properties["classes"]) == CLASSES


@pytest.mark.slow
def test_grpc_waveforms_answer_as_rest_does(audio_server):
    """The test files decoded here, as one FP32 batch (raw bytes and typed contents) and one by
    one as the package stage and bench/serve_bench.py send them."""
    stub, model, client, files = (audio_server[k] for k in ("stub", "model", "client", "files"))
    rest = served_probabilities([post_audio(client, name, data).json()
                                 for name, data, _ in files])
    waveforms = np.stack([PREP.load(data, name) for name, data, _ in files])
    for raw in (True, False):
        response = stub.ModelInfer(waveform_request(model, waveforms, raw=raw), timeout=10)
        outputs = {o.name: o for o in response.outputs}
        np.testing.assert_allclose(oip.probabilities_of(response), rest, atol=1e-6)
        assert [b.decode() for b in outputs["label"].contents.bytes_contents] == [
            label for *_, label in files]
        assert list(outputs["index"].contents.int64_contents) == rest.argmax(1).tolist()
    name, version = audio_server["report"]["champion"]["model_tag"].split(":")
    one = stub.ModelInfer(infra.infer_request(name, version, waveforms[:1]), timeout=10)
    np.testing.assert_allclose(oip.probabilities_of(one), rest[:1], atol=1e-6)


def bad_uploads() -> dict[str, tuple[str, bytes, str]]:
    """case -> (file name, bytes, what the 400 says)."""
    rng = np.random.default_rng(5)
    sound = tone(0, rng, 16000, 0.5)
    too_long = LIMITS.max_seconds + 1
    return {
        "an image": ("a.png", encode(np.zeros((8, 8), np.uint8), "PNG"), "audio: a .png file"),
        "PNG bytes named .wav": ("a.wav", encode(np.zeros((8, 8), np.uint8), "PNG"),
                                 "audio: cannot be decoded"),
        "an AIFF": ("a.wav", audio_file(sound, 16000, container="AIFF"),
                    "audio: AIFF audio is not accepted"),
        "corrupt WAV": ("a.wav", audio_file(sound, 16000)[:30], "audio: cannot be decoded"),
        "empty file": ("a.wav", b"", "audio: empty (0 bytes)"),
        "header only": ("a.wav", audio_file(sound[:0], 16000), "audio: holds no samples"),
        "too long": ("a.wav", audio_file(tone(1, rng, 8000, too_long), 8000),
                     f"audio: {too_long:.2f} s long, over the {LIMITS.max_seconds:g} s allowed"),
        "silent": ("a.wav", audio_file(np.zeros(16000, np.float32), 16000),
                   f"audio: silent (RMS 0, below the model's audio.preprocess.silent_rms "
                   f"{PARAMS.audio.preprocess.silent_rms:g})"),
        "silent where the model listens": (
            "a.flac", audio_file(np.concatenate([sound, np.zeros(48000, np.float32)]), 16000,
                                 container="FLAC"), "audio: silent"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", bad_uploads())
def test_bad_recordings_get_400_naming_the_cause(audio_server, case):
    name, data, message = bad_uploads()[case]
    response = post_audio(audio_server["client"], name, data)
    assert response.status_code == 400, response.text
    assert message in response.text, response.text


@pytest.mark.slow
def test_a_recording_over_the_limit_is_refused_from_its_first_bytes(audio_server):
    """A 1 kHz 8-bit WAV holds ~65 s in the 64 KiB InputGuard reads: the 400 comes back while
    the client still owes the rest of the body."""
    data = audio_file(np.full(400_000, 0.25, np.float32), 1000, subtype="PCM_U8")
    body, content_type = multipart([("audio", "long.wav", data)])
    with socket.create_connection(("127.0.0.1", audio_server["port"]), timeout=10) as client:
        client.sendall(f"POST /classify_audio HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                       f"{content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                       + body[:96 * 1024])
        answer = b""
        while b"}" not in answer:
            chunk = client.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert f"s long, over the {LIMITS.max_seconds:g} s allowed" in answer.decode(), answer


@pytest.mark.slow
def test_the_other_modalities_endpoints_refuse_naming_the_audio_endpoint(audio_server):
    client = audio_server["client"]
    pixels = np.zeros((1, 8, 8), np.uint8)
    requests = {
        "/classify": {"files": {"image": ("a.png", encode(pixels[0], "PNG"))}},
        "/classify_npy": {"files": {"array": ("a.npy", npy(pixels))}},
        "/classify_batch": {"json": {"images": pixels.tolist()}},
        "/classify_text": {"json": {"text": "one"}},
        "/classify_text_batch": {"json": {"texts": ["one"]}},
    }
    for path, kwargs in requests.items():
        response = client.post(path, **kwargs)
        assert response.status_code == 400, (path, response.text)
        assert ("this server serves an audio model; send a WAV, FLAC, Ogg, MP3, M4A or AAC "
                "file to /classify_audio") in response.text, (path, response.text)
    assert client.get("/readyz").status_code == 200


def clips(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([fit(tone(i % 3, rng, PREP.sample_rate, 0.8), PREP.clip_samples)
                     for i in range(n)])


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, message", [
    ({"values": clips(1, 0).astype(np.float64), "datatype": "FP64"},
     "waveform: datatype 'FP64' not accepted"),
    ({"values": clips(1, 0)[:, :100]}, f"waveform: shape [1, 100]; expected [N, {PREP.clip_samples}]"),
    ({"values": clips(1, 0)[0]}, f"waveform: shape [{PREP.clip_samples}]; expected [N,"),
    ({"values": clips(1, 0), "shape": [2, PREP.clip_samples]}, "raw_input_contents[0] holds"),
    ({"values": clips(1, 0), "shape": [3, PREP.clip_samples], "raw": False},
     "contents.fp32_contents holds"),
    ({"values": clips(1, 0)[:0]}, "waveform: no clips"),
    ({"values": clips(1, 0)[:, :4], "shape": [SERVE.max_batch_items + 1, PREP.clip_samples]},
     f"{SERVE.max_batch_items + 1} clips; at most {SERVE.max_batch_items}"),
    ({"values": np.where(np.arange(PREP.clip_samples) == 7, np.nan, clips(2, 0)).astype(np.float32)},
     "waveform: holds non-finite values"),
    ({"values": np.where(np.arange(PREP.clip_samples) == 7, 1.5, clips(1, 0)).astype(np.float32)},
     "waveform: values outside [-1, 1] (largest magnitude 1.5)"),
    ({"values": np.concatenate([clips(1, 0), np.zeros((1, PREP.clip_samples), np.float32)])},
     "waveform[1]: silent"),
    ({"values": clips(1, 0), "name": "texts"}, "this server serves an audio model"),
])
def test_grpc_bad_waveforms_get_invalid_argument_naming_the_cause(audio_server, kwargs, message):
    with pytest.raises(grpc.RpcError) as caught:
        audio_server["stub"].ModelInfer(waveform_request(audio_server["model"], **kwargs),
                                        timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_on_an_audio_model(audio_server, tmp_path):
    fuzz_finds_no_server_error(audio_server["client"], audio_server["port"], tmp_path)
