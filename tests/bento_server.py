"""A real `bentoml serve` on a free loopback port, for the tests that query a Bento over HTTP."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def bento_server(bento_tag: str, bentoml_home: Path, log: Path, ready_timeout_s: float = 60):
    """pipeline.package.serving with no --host (the Bento itself must pick loopback), on the
    given BentoML home; yields (httpx client, port)."""
    from pipeline.package import serving  # imported late: it imports bentoml

    previous = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(bentoml_home)  # the server subprocess inherits it
    try:
        with serving(bento_tag, log, ready_timeout_s, host=None) as client:
            yield client, client.base_url.port
    finally:
        if previous is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = previous
