"""A server whose worker cannot serve stops: `bentoml serve` exits with EXIT_CODE, the reason is
in its log, and its ports close.

BentoML 1.4's arbiter (circus) starts a new worker whenever one exits, whatever its exit code,
for as long as it runs: a model.onnx whose sha256 is not its card's, a card that does not parse,
an ONNX file ONNX Runtime refuses or a failed self-check made a server restart its workers 248
times in 90 s, its HTTP port open, /readyz never answering and `bentoml serve` never exiting.
None of those mends itself by retrying.

Two halves, both set up by importing pipeline/serving/service.py, which `bentoml serve` imports in its
own process (the arbiter) before it creates the watchers that start the workers, and each
worker imports again:
  - exit_worker (worker): the reason as one ERROR line, then the worker exits with EXIT_CODE;
  - stop_server_when_a_worker_cannot_serve (arbiter): every watcher gets an after_reap hook
    (circus calls it with each exited worker's code when it reaps it); a worker that exited
    with EXIT_CODE stops the arbiter (every worker, then the sockets), whose start() then
    raises SystemExit(EXIT_CODE) instead of returning (circus' own way out of start():
    Arbiter._exception). Circus reaps only at its periodic check (BentoML's check_delay: 10 s),
    so the arbiter also reaps as soon as a child exits (SIGCHLD): the server stops about a
    second after the worker gives up, not 10-17 s later.
A worker that exits with any other code is restarted as before.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import NoReturn

# uvicorn's own exit code for an application whose startup failed (uvicorn.config
# STARTUP_FAILURE); `bentoml serve` exits with it too.
EXIT_CODE = 3

log = logging.getLogger("bentoml.serve.kiln")  # the service's logger (pipeline/serving/http_guard.py)


def exit_worker(reason: str) -> NoReturn:
    """Log why this worker cannot serve and exit with EXIT_CODE at once: the arbiter then stops
    the server. os._exit, not SystemExit: uvicorn catches an exception raised while the app
    starts, logs it and exits 0, which the arbiter answers with a new worker."""
    log.error("cannot serve: %s; stopping the server (exit code %d)", reason, EXIT_CODE)
    logging.shutdown()  # flush the line before the process goes
    os._exit(EXIT_CODE)


def _stop_on_cannot_serve(watcher, arbiter, hook_name: str, exit_code: int | None = None,
                          **_) -> bool:
    """circus' after_reap hook: a worker that exited with EXIT_CODE stops the arbiter."""
    if exit_code == EXIT_CODE and arbiter is not None and arbiter._exception is None:
        log.error("a worker of %s exited with code %d (the reason is logged above): stopping "
                  "the server", watcher.name, exit_code)
        arbiter._exception = SystemExit(EXIT_CODE)
        arbiter.loop.add_callback(_stop, arbiter)
    return True


async def _stop(arbiter) -> None:
    """arbiter.stop() once the arbiter runs no other command: the hook runs inside its periodic
    manage_watchers, and circus refuses (ConflictError) a command while another is under way.
    Workers it starts meanwhile fail the same way and are stopped with the rest."""
    from tornado import gen

    while arbiter._exclusive_running_command is not None:
        await gen.sleep(0.05)  # s
    await arbiter.stop()


def _reap_on_child_exit(arbiter) -> None:
    """Reap an exited worker as soon as it exits (SIGCHLD), not at circus' next periodic check,
    while the arbiter runs (its own stop waits for its workers itself). Reaping is what that
    check does first (Arbiter.reap_processes); the check still restarts other workers."""
    def reap() -> None:
        if not arbiter._stopping:
            arbiter.reap_processes()

    def on_child_exit(signum, frame) -> None:
        if arbiter.loop is not None:
            # call_soon_threadsafe wakes the sleeping loop (tornado's add_callback, seeing the
            # loop running in this thread, would queue it silently until the next 10 s check)
            arbiter.loop.asyncio_loop.call_soon_threadsafe(reap)

    if threading.current_thread() is threading.main_thread():  # where Python runs handlers
        signal.signal(signal.SIGCHLD, on_child_exit)


def stop_server_when_a_worker_cannot_serve() -> None:
    """Give every watcher `bentoml serve` creates from now on the after_reap hook
    _stop_on_cannot_serve, and its arbiter _reap_on_child_exit. BentoML passes no hooks of its
    own: its serve_http imports bentoml.serving.create_watcher and
    bentoml._internal.utils.circus.create_standalone_arbiter when it runs, so the wrappers
    installed here are the ones it calls."""
    import bentoml._internal.utils.circus as circus_utils
    import bentoml.serving

    create_arbiter = circus_utils.create_standalone_arbiter
    if not getattr(create_arbiter, "reaps_on_child_exit", False):
        def create_arbiter_reaping_on_child_exit(*args, **kwargs):
            arbiter = create_arbiter(*args, **kwargs)
            _reap_on_child_exit(arbiter)
            return arbiter

        create_arbiter_reaping_on_child_exit.reaps_on_child_exit = True
        circus_utils.create_standalone_arbiter = create_arbiter_reaping_on_child_exit

    create_watcher = bentoml.serving.create_watcher
    if getattr(create_watcher, "stops_server", False):
        return

    def create_watcher_stopping_server(*args, **kwargs):
        hooks = {**(kwargs.pop("hooks", None) or {}), "after_reap": (_stop_on_cannot_serve, False)}
        return create_watcher(*args, hooks=hooks, **kwargs)

    create_watcher_stopping_server.stops_server = True
    bentoml.serving.create_watcher = create_watcher_stopping_server
