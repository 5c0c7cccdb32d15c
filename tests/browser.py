"""A page opened in headless Chromium with the network off, as a user without internet sees it.

Chromium runs in a new network namespace (`unshare --net`, root) with only loopback up, so
nothing can leave; Chromium's NetLog records every request a page makes all the same, so a test
can also assert that the page tried nothing outside. A page served on the host's loopback
(http://127.0.0.1:PORT/...) is reached through a Unix socket bridge: sockets on the filesystem
cross network namespaces, TCP ones do not.

Run as `python -m tests.browser URL OUT WINDOW [SOCKET]` only by `offline_page`, inside the
namespace (WINDOW: `W,H` in px, or `default`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "chromium"
RENDER_BUDGET_MS = 8000  # virtual time for scripts and fonts before the DOM is dumped
# Chromium's own calls (network time, search prefetch...) carry no page origin.
BROWSER_INITIATOR = "not an origin"


@dataclass
class Page:
    dom: str               # the DOM after scripts ran (--dump-dom)
    requests: list[str]    # every URL the page requested outside loopback and file://


def need_chromium() -> None:
    """Fail in CI (.ci/run installs Chromium), skip elsewhere, when Chromium is missing."""
    if shutil.which(CHROMIUM) and shutil.which("unshare"):
        return
    if os.environ.get("CI"):
        pytest.fail("chromium not installed: .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium not installed (apt-get install chromium)")


def offline_page(url: str, tmp: Path, window: tuple[int, int] | None = None) -> Page:
    """`url` (file:// or http://127.0.0.1:PORT/...) rendered in Chromium with no network, in a
    window of `window` (width, height) px or Chromium's default size."""
    need_chromium()
    tmp.mkdir(parents=True, exist_ok=True)
    command = ["unshare", "--net", sys.executable, "-m", "tests.browser", url, str(tmp),
               ",".join(map(str, window)) if window else "default"]
    host = urlsplit(url)
    bridge = None
    if host.scheme == "http":
        path = Path(tempfile.mkdtemp(prefix="kiln-")) / "bridge"  # short: 107 bytes at most
        bridge = socket.socket(socket.AF_UNIX)
        bridge.bind(str(path))
        bridge.listen()
        _relay(bridge, lambda: socket.create_connection((host.hostname, host.port)))
        command.append(str(path))
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        if bridge is not None:
            bridge.close()
            shutil.rmtree(path.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    return Page(dom=(tmp / "dom.html").read_text(), requests=_page_requests(tmp / "net.json"))


def _page_requests(netlog: Path) -> list[str]:
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    jobs = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    urls = [j["url"] for j in jobs if "url" in j and j.get("initiator") != BROWSER_INITIATOR]
    return sorted({u for u in urls if urlsplit(u).hostname not in ("127.0.0.1", "localhost")})


def _relay(listener: socket.socket, connect) -> None:
    """Forward every connection accepted on `listener` to a socket from `connect()`, both ways,
    on daemon threads (they end with the connections)."""
    def pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed
                return
            upstream = connect()
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def _render_in_namespace(url: str, out: Path, window: str, bridge: str | None) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if bridge:
        host = urlsplit(url)
        listener = socket.create_server((host.hostname, host.port))
        _relay(listener, lambda: _unix_connection(bridge))
    with open(out / "dom.html", "w") as dom:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={out / 'profile'}", f"--log-net-log={out / 'net.json'}",
             f"--virtual-time-budget={RENDER_BUDGET_MS}", "--dump-dom", url]
            + [f"--window-size={window}"] * (window != "default"),
            stdout=dom, stderr=subprocess.DEVNULL, check=True, timeout=90)


def _unix_connection(path: str) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(path)
    return connection


if __name__ == "__main__":
    _render_in_namespace(sys.argv[1], Path(sys.argv[2]), sys.argv[3],
                         sys.argv[4] if len(sys.argv) > 4 else None)
