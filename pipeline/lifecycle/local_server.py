"""A Bento served on a free loopback port for as long as the process that started it lives: the
package stage's infra validation, the tests and bench/serve_bench.py use it.

`bentoml serve` starts an arbiter and worker processes (each worker in a session of its own).
They run under a watchdog, `python -m pipeline.lifecycle.local_server <command>`, whose stdin is a pipe from the
process that called `serving`. When that pipe closes (the caller left the `with` block, or died,
SIGKILL included: the kernel closes a dead process's pipes), the watchdog asks the server to stop
and then SIGKILLs every process it started that is still there, workers included. So no server
outlives a killed package stage.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil

from pipeline import StageError

STOP_GRACE_S = 10.0  # s the server gets to stop its workers before they are killed


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 (held together while chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


class Served(httpx.Client):
    """An httpx client of the served Bento's HTTP API; grpc_port: its gRPC port on 127.0.0.1."""
    grpc_port: int


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def serving(bento: str, log: Path, ready_timeout_s: float, env: dict[str, str] | None = None,
            host: str | None = "127.0.0.1", python: str = sys.executable) -> Iterator[Served]:
    """`bentoml serve <bento>` (a tag or a Bento folder) on a free loopback port, gRPC on another
    (KILN_GRPC_PORT), its output in `log`; yields an httpx client once /readyz answers 200, with
    the gRPC port as its grpc_port, and stops the server after. host=None passes no --host, so
    the Bento's own config decides (it says 127.0.0.1) unless env sets BENTOML_HOST. `python`
    runs bentoml (another virtualenv's, say)."""
    port, grpc_port = free_ports(2)
    env = {**(os.environ if env is None else env), "KILN_GRPC_PORT": str(grpc_port)}
    command = [python, "-m", "bentoml", "serve", bento, "--port", str(port),
               *(["--host", host] if host else [])]
    with open(log, "w") as log_file:
        watchdog = subprocess.Popen([sys.executable, "-m", "pipeline.lifecycle.local_server", *command],
                                    stdin=subprocess.PIPE, stdout=log_file,
                                    stderr=subprocess.STDOUT, cwd=log.parent, env=env,
                                    start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if watchdog.poll() is not None:
                raise StageError(f"`bentoml serve {bento}` exited with code "
                                 f"{watchdog.returncode} before it was ready:\n{_tail(log)}")
            # A worker that cannot serve stops the server (pipeline/serving/cannot_serve.py), at the
            # arbiter's next check (~10 s); one whose startup failed otherwise is restarted
            # forever: fail fast on either.
            text = log.read_text(errors="replace")
            if "cannot serve: " in text or "Application startup failed" in text:
                raise StageError(f"{bento} failed to start before it was ready:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise StageError(f"{bento} not ready after {ready_timeout_s} s:\n{_tail(log)}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        with Served(base_url=url, timeout=30) as client:
            client.grpc_port = grpc_port
            yield client
    finally:
        watchdog.stdin.close()  # the watchdog's cue to stop the server
        try:
            watchdog.wait(timeout=STOP_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(watchdog.pid, signal.SIGKILL)
            watchdog.wait()


def _kill_all(processes: list) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def watch(command: list[str]) -> int:
    """Run `command` until stdin reaches EOF, then stop it and kill every process it started;
    if the command exits first, kill what it left and return its exit code."""
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    root = psutil.Process(server.pid)
    started: dict[int, psutil.Process] = {}  # every descendant seen, by pid

    def stop_when_stdin_closes() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the caller closed the pipe or died
        with contextlib.suppress(psutil.NoSuchProcess):
            started.update((p.pid, p) for p in root.children(recursive=True))
        server.terminate()  # BentoML's arbiter stops its workers on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(STOP_GRACE_S)
        _kill_all([root, *started.values()])
        os._exit(server.returncode if server.returncode is not None else 1)

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    while server.poll() is None:  # note the workers while they live: once the arbiter is
        with contextlib.suppress(psutil.NoSuchProcess):  # gone, they are nobody's children
            started.update((p.pid, p) for p in root.children(recursive=True))
        time.sleep(0.5)
    _kill_all(list(started.values()))
    return server.returncode


if __name__ == "__main__":
    sys.exit(watch(sys.argv[1:]))
