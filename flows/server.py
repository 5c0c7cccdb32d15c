"""`python -m flows.server --port N`: the local Prefect server `make schedule` starts, with its API,
scheduler and UI on 127.0.0.1:N only.

`prefect server start --port N` alone serves a UI that calls the API on port 4200: the UI asks
the server's /ui-settings for the API URL, which Prefect derives from PREFECT_API_URL or
PREFECT_SERVER_API_HOST/PORT, never from --port. So the server is given the URL for N
(PREFECT_UI_API_URL) and the host and port with it. The UI is Prefect's classic one
(PREFECT_SERVER_UI_V2_ENABLED=false): it is served from Prefect's bundled files and requests
nothing outside 127.0.0.1, while 3.8's new UI (/v2, which the classic one offers a switch to)
fetches Amplitude's remote config (sr-client-cfg.amplitude.com) on every load, whatever
PREFECT_SERVER_ANALYTICS_ENABLED says (seen in headless Chromium's NetLog).

This process becomes the server (exec), so the process make's trap stops is the server itself.
"""
from __future__ import annotations

import argparse
import os
import sys

HOST = "127.0.0.1"


def server_env(port: int, env: dict[str, str]) -> dict[str, str]:
    """`env` with the settings that put the server, and the API URL its UI uses, on `port`."""
    return {**env, "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": api_url(port), "PREFECT_SERVER_UI_V2_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.server")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    port = parser.parse_args(argv).port
    if not 0 < port < 65536:
        parser.error(f"--port {port}: not a TCP port (1-65535)")
    command = server_command(port)
    os.execve(command[0], command, server_env(port, dict(os.environ)))


if __name__ == "__main__":
    main(sys.argv[1:])
