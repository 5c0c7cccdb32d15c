"""Progress lines of the stages that run for more than a few seconds: one line per step (an
epoch, a variant, a phase) with the seconds since the stage began, printed to stdout and flushed
at once, so `dvc repro` and the Prefect flow show each step as it ends."""
from __future__ import annotations

import time


class Progress:
    def __init__(self, stage: str):
        self.stage, self.start = stage, time.perf_counter()

    def __call__(self, step: str) -> None:
        print(f"{self.stage}: {step} [{time.perf_counter() - self.start:.1f} s]", flush=True)
