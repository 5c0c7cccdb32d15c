"""Serving benchmark: Kiln's Bento (HTTP and gRPC) against a naive server, same machine, same client.

    python bench/serve_bench.py --data data/ingested --float-model models/float \
        [--bento TAG] [--duration 5] [--repeats 3] [--out reports/serve_bench.json]

Servers (both on 127.0.0.1, started and stopped by this script):
  kiln   the champion's Bento (or --bento) under `bentoml serve`, as `make serve` runs it: ONNX
         Runtime on the selected variant, with the Bento's own settings (params.yaml serve: HTTP
         workers, batch threads, access log), printed with the results.
  kiln gRPC  the same `bentoml serve` processes' gRPC port (Open Inference Protocol v2,
         pipeline/serving/oip.py): ModelInfer with one test image's raw uint8 pixels (the client sends
         pixels, HTTP /classify gets the PNG file and decodes it).
  naive  FastAPI + uvicorn.run defaults (one process) running the float model in torch eager
         mode, one image per request, decoded and preprocessed with the same pipeline.modalities.image.preprocess
         code. Both servers get uvloop and httptools (uvicorn uses them when installed).

Client: one asyncio process speaking HTTP/1.1 itself over keep-alive connections: each request
is encoded once up front (multipart/form-data or JSON, as any client would send it) and each
response is read by its Content-Length and parsed as JSON. A general-purpose client (httpx) cost
~3 ms per request here, more than either server, and shared the same 2 cores. `c` tasks, one
connection each, post test PNGs (cycling through the test split) to POST /classify and await
each answer before the next (closed loop). gRPC: the same loop in the same process with
grpc.aio, one channel (own TCP connection: a local subchannel pool) per client task, each
request serialized once up front, the response deserialized by the stub. For each server and c
in (1, 32): 1 s warm-up, then `--duration` s measured; per request the wall time from send to
parsed JSON (gRPC: parsed protobuf). Reported per run: p50 and p99 latency (ms) and completed
requests/s; the table gives the median over `--repeats` runs, servers interleaved (kiln, kiln
gRPC, naive, kiln, ...) so that load drifts hit all. Batch
throughput: one client posting 256 test images per request to /classify_npy (raw .npy) and to
/classify_batch (JSON lists); images/s. The client shares the machine's cores with the servers
(2 cores here): absolute numbers include its cost. Loopback only; total time
(6 * duration + 6) * repeats + 2 * (duration + 1) * repeats + server starts (~10 s).
`uptime` load averages are recorded before and after.

Text mode (a text model's Bento, issue 12):

    python bench/serve_bench.py text --data data/ingested [--bento TAG | --tiny [--encoder]] \
        [--duration 5] [--repeats 3] [--out reports/serve_bench_text.json]

The same client and method, no naive server: c clients post one test text each (cycling through
the test split, as JSON {"text": ...}) to POST /classify_text, and the same texts as one-element
BYTES ModelInfer requests (pipeline/modalities/text/infra.py infer_request) over gRPC, for c in (1, 32),
servers interleaved; then one client posting 256 test texts per request to /classify_text_batch
(texts/s). --tiny benchmarks a Bento of tests/test_text_service.py's tiny text model (embedding
mean + linear, its generated texts as --data) built by the package stage into a throwaway
BentoML home: serving overhead with a model that costs almost nothing; --encoder puts a
BERT-style encoder of params.yaml text's size (dim, layers, heads, ffn) into it.

Audio mode (an audio model's Bento, issue 13):

    python bench/serve_bench.py audio --data data/ingested [--bento TAG | --tiny] \
        [--duration 5] [--repeats 3] [--out reports/serve_bench_audio.json]

The same client and method, no naive server and no batch endpoint: c clients post one test clip
each as its file (multipart "audio", cycling through the test split) to POST /classify_audio,
which decodes, resamples and fits it, and the same clips decoded here (AudioPreprocessing.load)
as one-clip FP32 ModelInfer requests (pipeline/modalities/audio/infra.py infer_request) over gRPC, for c in
(1, 32), servers interleaved. --tiny benchmarks a Bento of tests/test_audio_service.py's tiny
audio model (a strided Conv1d, log energy, a linear head) built by the package stage into a
throwaway BentoML home, its test split 1 s tones written as eSpeak NG writes speech (22.05 kHz
16-bit mono WAV): serving overhead, decoding and resampling included, with a model that costs
almost nothing.
"""

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
from open_inference.grpc.protocol import ModelInferResponse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("BENTOML_HOME", str(REPO / ".bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

CONCURRENCY = (1, 32)
BATCH = 256  # images per batch request


# ---- the naive server -------------------------------------------------------------------------

def naive_app(model_dir: Path):
    """FastAPI app: POST /classify (multipart "image") -> {"label", "index"}, torch eager."""
    import torch
    from fastapi import FastAPI, UploadFile
    from PIL import Image

    from pipeline.core import saved_model

    model, card = saved_model.load(model_dir)
    prep = card.preprocessing
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/classify")
    def classify(image: UploadFile) -> dict:  # sync: FastAPI runs it in its thread pool
        with Image.open(image.file) as decoded:
            pixels = prep.pixels(decoded)
        with torch.inference_mode():
            logits = model(torch.from_numpy(prep.normalize(pixels[None])))
        index = int(logits.argmax(1))
        return {"label": card.classes[index], "index": index}

    return app


# ---- servers ------------------------------------------------------------------------------------

@contextmanager
def naive_server(model_dir: Path, log: Path):
    from pipeline.lifecycle.local_server import free_port

    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, __file__, "naive-server", "--float-model", str(model_dir),
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"naive server did not start:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


@contextmanager
def kiln_server(bento: str, log: Path):
    """Yields (HTTP URL, gRPC port)."""
    from pipeline.lifecycle.local_server import serving

    with serving(bento, log, ready_timeout_s=60) as client:
        yield str(client.base_url).rstrip("/"), client.grpc_port


# ---- the client ---------------------------------------------------------------------------------

def http_post(path: str, content_type: str, body: bytes) -> bytes:
    """One complete HTTP/1.1 POST request, keep-alive (the 1.1 default)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def multipart_post(path: str, field: str, filename: str, data: bytes, content_type: str) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return http_post(path, f"multipart/form-data; boundary={boundary}", body)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one response framed by Content-Length (both servers send it)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    length = {k.strip().lower(): v.strip() for k, v in headers.items()}.get("content-length")
    if length is None:
        raise RuntimeError(f"response without Content-Length: {lines[0]}")
    return int(lines[0].split()[1]), await reader.readexactly(int(length))


@asynccontextmanager
async def http_connection(port: int):
    """One keep-alive connection; yields call(request bytes) -> True on HTTP 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def call(request: bytes) -> bool:
        writer.write(request)
        status, body = await read_response(reader)
        json.loads(body)
        return status == 200

    try:
        yield call
    finally:
        writer.close()


@asynccontextmanager
async def grpc_connection(port: int):
    """One gRPC channel with its own TCP connection (a local subchannel pool: channels would
    otherwise share one, and SO_REUSEPORT could not spread them over the workers); yields
    call(serialized ModelInferRequest) -> True on OK."""
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    response_deserializer=ModelInferResponse.FromString)
        await channel.channel_ready()

        async def call(request: bytes) -> bool:
            try:
                await infer(request)
            except grpc.aio.AioRpcError:
                return False
            return True

        yield call


async def closed_loop(connect, requests: list[bytes], concurrency: int, warmup_s: float,
                      duration_s: float) -> dict:
    """`concurrency` connections (connect(): http_connection or grpc_connection) sending
    `requests` in turn; latencies of requests that start after the warm-up and finish before
    its end + duration_s."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def worker(k: int) -> None:
        nonlocal errors
        async with connect() as call:
            i = k
            while (now := time.perf_counter()) < stop_at:
                ok = await call(requests[i % len(requests)])
                done = time.perf_counter()
                if not ok:
                    errors += 1
                elif now >= measure_from and done <= stop_at:
                    latencies.append(done - now)
                i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    latencies_ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "errors": errors,
            "rps": len(latencies) / duration_s,
            "p50_ms": float(np.percentile(latencies_ms, 50)) if len(latencies) else None,
            "p99_ms": float(np.percentile(latencies_ms, 99)) if len(latencies) else None}


def run(url: str, requests: list[bytes], concurrency: int, duration_s: float) -> dict:
    """HTTP (url "http://127.0.0.1:PORT") or gRPC (url "grpc://127.0.0.1:PORT")."""
    port = int(url.rsplit(":", 1)[1])
    connection = grpc_connection if url.startswith("grpc:") else http_connection
    return asyncio.run(closed_loop(lambda: connection(port), requests, concurrency, 1.0, duration_s))


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def median_of(runs: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in runs), 3)
            for key in ("rps", "p50_ms", "p99_ms") if all(r[key] is not None for r in runs)} | {
        "errors": sum(r["errors"] for r in runs), "runs": len(runs)}


def champion_bento(args) -> str:
    from pipeline import StageError
    from pipeline.lifecycle.champion import Exports, bento_to_serve

    try:
        return args.bento or bento_to_serve(args.champion, Exports(args.export))
    except StageError as e:
        sys.exit(f"no --bento and no champion to serve ({e}): run the pipeline first")


def tiny_text_bento(root: Path, encoder: bool) -> tuple[str, Path]:
    """tests/test_text_service.py's tiny text model (with an encoder: write_tiny_text_model),
    packaged (infra validation included) into root's BentoML home, which this process then
    uses; -> (Bento tag, ingested text folder)."""
    from tests.test_text_service import run_package, write_ingested_texts, write_tiny_text_model

    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    write_tiny_text_model(root / "selected", encoder=encoder)
    write_ingested_texts(root / "ingested", 64, seed=7)
    done, report = run_package(root / "selected", root / "ingested", root / "bentoml")
    if done.returncode != 0:
        sys.exit(f"package stage failed on the tiny text model:\n{done.stderr[-3000:]}")
    return report["champion"]["bento_tag"], root / "ingested"


def tiny_audio_bento(root: Path) -> tuple[str, Path]:
    """tests/test_audio_service.py's tiny audio model, packaged (infra validation included) into
    root's BentoML home, which this process then uses; -> (Bento tag, ingested audio folder)."""
    from tests.test_audio_service import (run_package, write_ingested_clips,
                                          write_tiny_audio_model)

    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    write_tiny_audio_model(root / "selected")
    write_ingested_clips(root / "ingested", 64, seed=7, formats=[("WAV", "PCM_16", 22050, 1)],
                         seconds=(1.0, 1.0))
    done, report = run_package(root / "selected", root / "ingested", root / "bentoml")
    if done.returncode != 0:
        sys.exit(f"package stage failed on the tiny audio model:\n{done.stderr[-3000:]}")
    return report["champion"]["bento_tag"], root / "ingested"


def split_files(data: Path, split: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each item of one split of the ingested folder `data`, in shard
    order: the files as they came, what a client uploads."""
    from pipeline.core.dataset import item_batches

    return [(Path(r["id"]).name, d) for rows, items in item_batches(data, [split], 1024)
            for r, d in zip(rows, items)]


def single_runs(bento: str, payloads: dict[str, tuple[str | None, list[bytes]]], args,
                batch: list[bytes] | None = None) -> dict[tuple, list[dict]]:
    """(name, c) -> runs of each payload set (path None: gRPC) for c in CONCURRENCY, servers
    interleaved, `args.repeats` times; ("batch", 1) -> runs of one client posting `batch`."""
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            kiln_server(bento, Path(tmp, "kiln.log")) as (kiln_url, grpc_port):
        for _ in range(args.repeats):
            for c in CONCURRENCY:
                for name, (path, requests) in payloads.items():
                    url = kiln_url if path else f"grpc://127.0.0.1:{grpc_port}"
                    runs.setdefault((name, c), []).append(run(url, requests, c, args.duration))
            if batch:
                runs.setdefault(("batch", 1), []).append(run(kiln_url, batch, 1, args.duration))
    return runs


def print_singles(results: dict, names) -> None:
    print(json.dumps(results, indent=1))
    print("\n| server | clients | p50 (ms) | p99 (ms) | req/s |\n|---|---:|---:|---:|---:|")
    for c in CONCURRENCY:
        for name in names:
            m = results["single"][f"{name}_c{c}"]
            print(f"| {name} | {c} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['rps']:.0f} |")


def audio_bench(args) -> dict:
    """Audio mode (module doc): p50/p99 and req/s of one clip per request over REST (its file)
    and gRPC (its decoded waveform)."""
    import bentoml
    import soundfile

    from pipeline.modalities.audio.infra import infer_request as audio_infer_request
    from pipeline.core.card import read_card

    bento = champion_bento(args)
    info = bentoml.bentos.get(bento).info
    model, version = info.args["model_tag"].split(":")
    prep = read_card(Path(bentoml.models.get(info.args["model_tag"]).path)).preprocessing
    files = split_files(args.data, "test")  # (file name, bytes as ingested) per clip
    payloads = {
        "kiln_audio": ("/classify_audio", [multipart_post("/classify_audio", "audio", name,
                                                          data, "application/octet-stream")
                                           for name, data in files]),
        "kiln_audio_grpc": (None, [audio_infer_request(model, version,
                                                       prep.load(data, name)[None]
                                                       ).SerializeToString()
                                   for name, data in files])}
    seconds = [soundfile.info(io.BytesIO(data)).duration for _, data in files]
    results: dict = {"load_before": load_average(), "bento": bento,
                     "bento_config": info.services[0].config, "duration_s": args.duration,
                     "repeats": args.repeats, "test_clips": len(files),
                     "mean_clip_s": round(float(np.mean(seconds)), 3),
                     "mean_file_bytes": round(float(np.mean([len(data) for _, data in files]))),
                     "single": {}}
    for (name, c), rs in single_runs(bento, payloads, args).items():
        results["single"][f"{name}_c{c}"] = median_of(rs)
    results["load_after"] = load_average()
    print_singles(results, payloads)
    return results


def text_bench(args) -> dict:
    """Text mode (module doc): p50/p99 and req/s of one text per request over REST and gRPC,
    and /classify_text_batch throughput."""
    import bentoml

    from pipeline.core.dataset import load_texts
    from pipeline.modalities.text.infra import infer_request as text_infer_request

    bento = champion_bento(args)
    texts, _ = load_texts(args.data, "test")
    info = bentoml.bentos.get(bento).info
    model, version = info.args["model_tag"].split(":")
    payloads = {
        "kiln_text": ("/classify_text", [http_post("/classify_text", "application/json",
                                                   json.dumps({"text": t}).encode()) for t in texts]),
        "kiln_text_grpc": (None, [text_infer_request(model, version, [t]).SerializeToString()
                                  for t in texts])}
    batch = [http_post("/classify_text_batch", "application/json",
                       json.dumps({"texts": list(np.resize(np.array(texts, object), BATCH))}).encode())]
    results: dict = {"load_before": load_average(), "bento": bento,
                     "bento_config": info.services[0].config, "duration_s": args.duration,
                     "repeats": args.repeats, "test_texts": len(texts),
                     "mean_text_bytes": round(float(np.mean([len(t.encode()) for t in texts])), 1),
                     "single": {}, "batch": {}}
    for (name, c), rs in single_runs(bento, payloads, args, batch).items():
        if name == "batch":
            results["batch"]["/classify_text_batch"] = {
                "texts_per_s": round(statistics.median(r["rps"] * BATCH for r in rs)),
                **median_of(rs)}
        else:
            results["single"][f"{name}_c{c}"] = median_of(rs)
    results["load_after"] = load_average()
    print_singles(results, payloads)
    m = results["batch"]["/classify_text_batch"]
    print(f"\nbatch /classify_text_batch: {m['texts_per_s']:,} texts/s ({BATCH} per request, "
          f"p50 {m['p50_ms']:.1f} ms)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", default="bench",
                        choices=["bench", "text", "audio", "naive-server"])
    parser.add_argument("--data", type=Path, default=Path("data/ingested"))
    parser.add_argument("--float-model", type=Path, default=Path("models/float"))
    parser.add_argument("--bento", help="Bento tag (default: the champion `make serve` serves)")
    parser.add_argument("--champion", type=Path, default=Path("reports/champion.json"),
                        help="the champion record (without --bento: its champion is served)")
    parser.add_argument("--export", type=Path, default=Path("models/champion"),
                        help="the exported Bentos the record names")
    parser.add_argument("--port", type=int)
    parser.add_argument("--duration", type=float, default=5.0, help="s measured per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true",
                        help="text or audio mode: a Bento of the tests' tiny model, built here")
    parser.add_argument("--encoder", action="store_true",
                        help="--tiny: with an encoder of params.yaml text's size")
    args = parser.parse_args()

    if args.mode in ("text", "audio"):
        with tempfile.TemporaryDirectory() as tmp:
            if args.tiny and args.mode == "text":
                args.bento, args.data = tiny_text_bento(Path(tmp), args.encoder)
            elif args.tiny:
                args.bento, args.data = tiny_audio_bento(Path(tmp))
            results = (text_bench if args.mode == "text" else audio_bench)(args)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
        return

    if args.mode == "naive-server":
        import uvicorn
        uvicorn.run(naive_app(args.float_model), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return

    from pipeline.core.card import read_card
    from pipeline.core.dataset import load_split
    from pipeline.modalities.image.infra import infer_request

    bento = champion_bento(args)
    files = split_files(args.data, "test")
    singles = [multipart_post("/classify", "image", "x.png", data, "image/png")
               for _, data in files]
    pixels, _ = load_split(args.data, "test", read_card(args.float_model).preprocessing)
    batch = np.resize(pixels, (BATCH, *pixels.shape[1:]))
    buffer = io.BytesIO()
    np.save(buffer, batch)
    batch_payloads = {
        "/classify_npy": [multipart_post("/classify_npy", "array", "b.npy", buffer.getvalue(),
                                         "application/octet-stream")],
        "/classify_batch": [http_post("/classify_batch", "application/json",
                                      json.dumps({"images": batch.tolist()}).encode())]}

    import bentoml

    info = bentoml.bentos.get(bento).info
    config = info.services[0].config  # workers, access log, ...
    model, version = info.args["model_tag"].split(":")
    grpc_singles = [infer_request(model, version, pixels[i:i + 1]).SerializeToString()
                    for i in range(len(pixels))]
    results: dict = {"load_before": load_average(), "bento": bento, "bento_config": config,
                     "duration_s": args.duration,
                     "repeats": args.repeats, "test_images": len(files), "single": {}, "batch": {}}
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            kiln_server(bento, Path(tmp, "kiln.log")) as (kiln_url, grpc_port), \
            naive_server(args.float_model, Path(tmp, "naive.log")) as naive_url:
        for _ in range(args.repeats):
            for c in CONCURRENCY:
                for name, url, payloads in (("kiln", kiln_url, singles),
                                            ("kiln_grpc", f"grpc://127.0.0.1:{grpc_port}", grpc_singles),
                                            ("naive", naive_url, singles)):
                    runs.setdefault((name, c), []).append(run(url, payloads, c, args.duration))
            for path, payloads in batch_payloads.items():
                r = run(kiln_url, payloads, 1, args.duration)
                runs.setdefault(("kiln" + path, 1), []).append({**r, "images_per_s": r["rps"] * BATCH})
    for (name, c), rs in runs.items():
        if name.startswith("kiln/"):
            results["batch"][name.removeprefix("kiln")] = {
                "images_per_s": round(statistics.median(r["images_per_s"] for r in rs)),
                **median_of(rs)}
        else:
            results["single"][f"{name}_c{c}"] = median_of(rs)
    results["load_after"] = load_average()
    for c in CONCURRENCY:
        kiln, naive = results["single"][f"kiln_c{c}"], results["single"][f"naive_c{c}"]
        results["single"][f"speedup_rps_c{c}"] = round(kiln["rps"] / naive["rps"], 2)

    print(json.dumps(results, indent=1))
    print("\n| server | clients | p50 (ms) | p99 (ms) | req/s |\n|---|---:|---:|---:|---:|")
    for c in CONCURRENCY:
        for name in ("kiln", "kiln_grpc", "naive"):
            m = results["single"][f"{name}_c{c}"]
            print(f"| {name} | {c} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['rps']:.0f} |")
    for path, m in results["batch"].items():
        print(f"\nbatch {path}: {m['images_per_s']:,} images/s ({BATCH} per request, p50 {m['p50_ms']:.1f} ms)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
