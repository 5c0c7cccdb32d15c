"""What tests/test_offline.py runs inside a network namespace with only loopback: the package
stage on each tiny model given, an image and a text one (bentoml build, ONNX Runtime, the
infra-validation server), then a real `bentoml serve` of every Bento built, all at once,
answering requests for --hold-s seconds, long enough for a background thread that calls out
some seconds after start (ONNX Runtime 1.29+'s telemetry looked up its host ~9 s after import)
to do so. Writes what happened to --out (JSON).

    python -m tests.offline_session --model DIR --data DIR [--model DIR --data DIR ...]
        --home DIR --hold-s S --out FILE
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

from tests.bento_server import bento_server
from tests.ingested import items_of
from tests.tiny_bento import run_package


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.offline_session")
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="a selected model's folder (one per --data)")
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="an ingested folder")
    parser.add_argument("--home", type=Path, required=True, help="the BentoML home")
    parser.add_argument("--hold-s", type=float, required=True, help="s of requests to the server")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result: dict = {"package": []}
    served = []  # (bento tag, request that classifies one of its test items)
    for model, data in zip(args.model, args.data, strict=True):
        done, report = run_package(model, data, args.home)
        result["package"].append({"returncode": done.returncode, "stderr": done.stderr[-3000:],
                                  "report": report})
        if report is None:
            continue
        row, item = items_of(data, "test")[0]
        if row["id"].startswith("texts/"):  # a text model's data
            request = ("/classify_text", {"json": {"text": item.decode()}})
        else:
            request = ("/classify", {"files": {"image": (Path(row["id"]).name, item)}})
        served.append((report["champion"]["bento_tag"], request))
    statuses: Counter = Counter()
    with contextlib.ExitStack() as stack:
        clients = [(stack.enter_context(bento_server(
            tag, args.home, args.out.with_suffix(f".serve{i}.log")))[0], request)
            for i, (tag, request) in enumerate(served)]
        start = time.monotonic()
        while clients and time.monotonic() - start < args.hold_s:
            for client, (endpoint, body) in clients:
                statuses[f"{endpoint} {client.post(endpoint, **body).status_code}"] += 1
                statuses[f"/readyz {client.get('/readyz').status_code}"] += 1
            time.sleep(0.2)
        result["served_s"] = time.monotonic() - start
    result["responses"] = dict(statuses)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
