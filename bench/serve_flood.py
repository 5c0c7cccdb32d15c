"""How long one hostile gRPC message holds a worker's event loop (issue 22): 2,000,000 empty texts
in one ModelInfer, far over serve.max_batch_items, sent to a text model's Bento.

    python bench/serve_flood.py [--bento TAG] [--repeats 5] [--out reports/serve_flood.json]

Without --bento: tests/test_text_service.py's tiny text model, packaged into a throwaway BentoML
home (serve_bench.py --tiny's Bento). The Bento is served by `bentoml serve` (pipeline.lifecycle.local_server);
one gRPC channel, so one TCP connection and one worker, carries both the flood and the probes.
Per run and per form of the texts ("raw": raw_input_contents, each element a 4-byte length, 8 MB;
"typed": contents.bytes_contents, 4 MB): ModelInfer of the flood in a thread while the main
thread calls ServerLive on the same channel every 10 ms until the flood is answered (at least 3
calls); recorded: the flood's wall time to its INVALID_ARGUMENT and the largest ServerLive
latency (s), the time the worker's event loop was held. The table gives the median over
--repeats runs. The client shares the machine's cores with the server.
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from open_inference.grpc import protocol as pb
from open_inference.grpc.service import GRPCInferenceServiceStub

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import kiln_server, load_average, tiny_text_bento  # noqa: E402

TEXTS = 2_000_000


def flood(model: str, raw: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="texts", datatype="BYTES", shape=[TEXTS])
    if raw:
        request.raw_input_contents.append(b"\0\0\0\0" * TEXTS)
    else:
        tensor.contents.bytes_contents.extend([b""] * TEXTS)
    return request


def one_run(stub, request: pb.ModelInferRequest) -> dict:
    answer = {}

    def send() -> None:
        started = time.perf_counter()
        try:
            stub.ModelInfer(request, timeout=120)
            answer["status"] = "OK"
        except grpc.RpcError as e:
            answer["status"] = f"{e.code().name}: {e.details()[:100]}"
        answer["flood_s"] = time.perf_counter() - started

    latencies = []
    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive() or len(latencies) < 3:
        started = time.perf_counter()
        stub.ServerLive(pb.ServerLiveRequest(), timeout=120)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    sender.join()
    return {**answer, "max_probe_s": max(latencies), "probes": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bento", help="a text model's Bento tag (default: the tiny one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bento = args.bento or tiny_text_bento(Path(tmp), encoder=False)[0]
        import bentoml  # after tiny_text_bento has chosen the BentoML home

        load_before = load_average()
        with kiln_server(bento, Path(tmp) / "serve.log") as (_, grpc_port):
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                                            options=[("grpc.max_send_message_length", 64 << 20)])
            stub = GRPCInferenceServiceStub(channel)
            model = bentoml.bentos.get(bento).info.args["model_tag"].split(":")[0]
            requests = {"raw": flood(model, raw=True), "typed": flood(model, raw=False)}
            runs = {form: [] for form in requests}
            for _ in range(args.repeats):
                for form, request in requests.items():  # interleaved: load drifts hit both
                    runs[form].append(one_run(stub, request))
            channel.close()
    results = {"bento": bento, "texts": TEXTS, "load_before": load_before,
               "load_after": load_average(), "runs": runs}
    print(f"load before {load_before}, after {results['load_after']}")
    print("| form | message bytes | status | flood (s) | loop held (s, largest ServerLive) |")
    for form, request in requests.items():
        median = {key: statistics.median(r[key] for r in runs[form])
                  for key in ("flood_s", "max_probe_s")}
        print(f"| {form} | {request.ByteSize():,} | {runs[form][0]['status'][:60]} | "
              f"{median['flood_s']:.3f} | {median['max_probe_s']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
