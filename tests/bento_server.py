"""A real `bentoml serve` on a free loopback port, for the tests that query a Bento over HTTP."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bento_server(bento_tag: str, bentoml_home: Path, log: Path, ready_timeout_s: float = 60):
    """`bentoml serve <bento_tag>` with no --host (the Bento itself must pick loopback);
    yields (httpx client, port), stops the whole process group after."""
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    with open(log, "w") as log_file:
        # Own process group, so the API workers it forks stop with it.
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", bento_tag, "--port", str(port)],
            cwd=log.parent, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s  # start to /readyz is ~2 s here
        while True:
            assert process.poll() is None, f"bentoml serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready after {ready_timeout_s} s:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
