"""`python -m flows.schedule`: serve Kiln's flow as a deployment on params.yaml's cron schedule.

Schedules are run by a Prefect server's scheduler, which the ephemeral server that `python -m
flows.kiln` starts does not run: point PREFECT_API_URL at a `prefect server start` (`make schedule`
starts one). This process registers the deployment, then polls the server and runs each
scheduled flow run in a subprocess until stopped (Ctrl-C pauses the schedule).
"""
from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prefect.runner import Runner
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from flows.kiln import REPO_ROOT, kiln_pipeline
from pipeline.params import ParamsError, ScheduleParams, load_params

# A server on a fresh database answers after ~10 s on 2 cores (STACK.md); allow 6x that.
SERVER_WAIT_S = 60.0  # s


def wait_for_api(api_url: str, timeout_s: float) -> None:
    """Block until the Prefect API answers /health, so serve can start right after the server."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Prefect server answered at {api_url} within {timeout_s:.0f} s "
                                   f"({e}); start one with `prefect server start`") from None
            time.sleep(0.5)


def kiln_runner(schedule: ScheduleParams, project_dir: Path = REPO_ROOT) -> Runner:
    """A Runner holding the scheduled Kiln deployment; registers it on the current Prefect API."""
    runner = Runner(name=f"kiln-{schedule.deployment}")
    # params.yaml's cron is in UTC; stated here so the server never falls back to another zone.
    runner.add_flow(kiln_pipeline, name=schedule.deployment,
                    schedule=Cron(schedule.cron, timezone="UTC"),
                    parameters={"project_dir": str(project_dir)})
    return runner


def main() -> int:
    if not PREFECT_API_URL.value():
        print("kiln schedule: error: PREFECT_API_URL is not set; schedules need a running Prefect "
              "server (`make schedule` starts one)", file=sys.stderr)
        return 1
    try:
        schedule = load_params(REPO_ROOT / "params.yaml").schedule
        wait_for_api(PREFECT_API_URL.value(), SERVER_WAIT_S)
    except (ParamsError, TimeoutError) as e:
        print(f"kiln schedule: error: {e}", file=sys.stderr)
        return 1
    runner = kiln_runner(schedule)
    print(f"Serving deployment '{kiln_pipeline.name}/{schedule.deployment}' on cron "
          f"'{schedule.cron}' (UTC) from {PREFECT_API_URL.value()}; Prefect UI at "
          f"{PREFECT_UI_URL.value()}. Run it now with: "
          f"prefect deployment run '{kiln_pipeline.name}/{schedule.deployment}'", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
