"""A real `bentoml serve` on a free loopback port, for the tests that query a Bento over HTTP,
and what those tests send it: hand-written multipart bodies, a schemathesis run."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from pipeline.lifecycle.local_server import serving

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def bento_server(bento: str, bentoml_home: Path, log: Path, ready_timeout_s: float = 60):
    """pipeline.lifecycle.local_server.serving of `bento` (a tag or an exported Bento folder) with no --host
    (the Bento itself must pick loopback), on the given BentoML home; yields (httpx client, port)."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    with serving(bento, log, ready_timeout_s, env=env, host=None) as client:
        yield client, client.base_url.port


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data body with parts (name, filename or None for
    a text field, data), as a client writes it by hand."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--kiln\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + b"--kiln--\r\n", "multipart/form-data; boundary=kiln"


def fuzz_finds_no_server_error(client: httpx.Client, port: int, tmp_path: Path) -> None:
    """A bounded, seeded schemathesis run with every check over every operation in the served
    OpenAPI document, with the project's schemathesis.toml (what `schemathesis run
    .../docs.json --checks all` reads from the repository): no response >= 500, every status,
    content type, header and body as /docs.json declares them, schema-invalid requests refused
    and valid ones accepted; the server is still ready afterwards."""
    url = f"http://127.0.0.1:{port}"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")),
         "--config-file", str(REPO / "schemathesis.toml"), "run", f"{url}/docs.json",
         "--checks", "all", "--phases", "examples,coverage,fuzzing", "--max-examples", "60",
         "--seed", "10", "--continue-on-failure", "--suppress-health-check", "all",
         "--generation-database", "none", "--request-timeout", "10"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert generated and int(generated[1]) == int(generated[2]) > 100, done.stdout[-4000:]
    assert client.get("/readyz").status_code == 200
