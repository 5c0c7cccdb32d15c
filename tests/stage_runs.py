"""Stages run as a user runs them, in a project folder of the tests' own: `cli` as a subprocess
(`python -m pipeline.stages ...`, what dvc.yaml runs), and the in-process runner behind the
`stage` fixture (tests/conftest.py: the same entry point, minus ~3 s of imports a call)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.core.dataset import read_manifest
from tests.project import REPO, stage_argv

VALIDATE = stage_argv("validate")


def cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.stages <args>` in `work`, with an empty BentoML store of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENTOML_HOME": str(work / ".bentoml")}
    return subprocess.run([sys.executable, "-m", "pipeline.stages", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)


def ingest_and_validate(stage, work: Path) -> tuple[int, str]:
    code, out = stage(work, "ingest", "--out", "data/ingested")
    assert code == 0, out
    return stage(work, *VALIDATE)


def problems(work: Path) -> dict:
    return json.loads((work / "reports/validation_details.json").read_text())["problems"]


def details(work: Path) -> dict:
    return json.loads((work / "reports/validation_details.json").read_text())


def manifest(work: Path) -> list[dict]:
    """The ingested items' rows: id, label, split, source."""
    return read_manifest(work / "data/ingested")[0]
