"""A real `bentoml serve` on a free loopback port, for the tests that query a Bento over HTTP."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pipeline.serving import serving


@contextlib.contextmanager
def bento_server(bento: str, bentoml_home: Path, log: Path, ready_timeout_s: float = 60):
    """pipeline.serving.serving of `bento` (a tag or an exported Bento folder) with no --host
    (the Bento itself must pick loopback), on the given BentoML home; yields (httpx client, port)."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    with serving(bento, log, ready_timeout_s, env=env, host=None) as client:
        yield client, client.base_url.port
