"""What tests/test_offline.py runs inside a network namespace with only loopback: the package
stage on a tiny image or text model (bentoml build, ONNX Runtime, the infra-validation server), then a real
`bentoml serve` of the Bento it built, answering requests for --hold-s seconds, long enough for
a background thread that calls out some seconds after start (ONNX Runtime 1.29+'s telemetry
looked up its host ~9 s after import) to do so. Writes what happened to --out (JSON).

    python -m tests.offline_session --model DIR --data DIR --home DIR --hold-s S --out FILE
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from tests.bento_server import bento_server
from tests.test_service import run_package


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.offline_session")
    parser.add_argument("--model", type=Path, required=True, help="a selected model's folder")
    parser.add_argument("--data", type=Path, required=True, help="an ingested folder")
    parser.add_argument("--home", type=Path, required=True, help="the BentoML home")
    parser.add_argument("--hold-s", type=float, required=True, help="s of requests to the server")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result: dict = {}
    done, report = run_package(args.model, args.data, args.home)
    result["package"] = {"returncode": done.returncode, "stderr": done.stderr[-3000:],
                         "report": report}
    if report is not None:
        text = next(args.data.glob("texts/test/*/*.txt"), None)  # a text model's data
        image = next(args.data.glob("images/test/*/*.png"), None)
        statuses: Counter = Counter()
        with bento_server(report["champion"]["bento_tag"], args.home,
                          args.out.with_suffix(".serve.log")) as (client, _):
            start = time.monotonic()
            while time.monotonic() - start < args.hold_s:
                if text is not None:
                    response = client.post("/classify_text", json={"text": text.read_text()})
                    statuses[f"/classify_text {response.status_code}"] += 1
                else:
                    response = client.post("/classify", files={
                        "image": (image.name, image.read_bytes())})
                    statuses[f"/classify {response.status_code}"] += 1
                statuses[f"/readyz {client.get('/readyz').status_code}"] += 1
                time.sleep(0.2)
            result["served_s"] = time.monotonic() - start
        result["responses"] = dict(statuses)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
