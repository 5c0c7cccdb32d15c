"""The one place Kiln runs a function over items in parallel. Every pass that decodes items goes
through `map_items`: validate's per-item description (every modality) and the split reading of
pipeline/core/dataset.py Items, which augment, train, compress, evaluate and package use. An
engine that spreads the work wider (a Ray cluster) replaces the process pool in this file.

`python -m pipeline.stages` starts the executor from params.yaml's `engine` section before a
stage runs; code that runs without it (a test calling a function, a benchmark) maps in its own
process. Results come back in item order whatever the number of workers, so no output depends
on it (tests/test_executor.py).

The pool's processes come from a fork server: a process forked from a stage that has already
run torch's (or ONNX Runtime's) thread pools can hang in them, a fresh server has none.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.params import EngineParams

_workers, _batch = 1, 1  # in this process until start(); a batch is one pool task's items


def start(engine: EngineParams) -> None:
    """Map with engine.workers processes (0: one per core this process may run on), in tasks
    of engine.batch items."""
    global _workers, _batch
    _workers = engine.workers or len(os.sched_getaffinity(0))
    _batch = engine.batch
    _pool.cache_clear()  # a pool started before had the old size


def span() -> int:
    """Items one round of map_items keeps every worker busy with: what a streaming pass reads
    at a time (pipeline/core/dataset.py)."""
    return _workers * _batch


def map_items(fn: Callable, items: Sequence) -> list:
    """[fn(item) for item in items], in order; in parallel when there is more than one task's
    worth of items and more than one worker. `fn` must pickle: a module's function, or a
    functools.partial of one."""
    tasks = [items[i:i + _batch] for i in range(0, len(items), _batch)]
    if _workers <= 1 or len(tasks) <= 1:
        return [fn(item) for item in items]
    return [r for done in _pool().map(functools.partial(_apply, fn), tasks) for r in done]


@functools.cache
def _pool() -> ProcessPoolExecutor:
    """The process's one pool, started at its first parallel map and kept for the next (a
    streaming pass maps round after round; a pool costs ~0.3 s to start), shut down at exit."""
    pool = ProcessPoolExecutor(max_workers=_workers,
                               mp_context=multiprocessing.get_context("forkserver"))
    atexit.register(pool.shutdown)
    return pool


def _apply(fn: Callable, items: Sequence) -> list:
    return [fn(item) for item in items]
