"""Champion and challenger: the package stage (as dvc.yaml runs it, with the real params.yaml)
promotes a first model, refuses a worse one, refuses one whose served answers differ from the
evaluated ones (infra validation), promotes an equal one, and `rollback` restores the previous
champion, which then serves. One BentoML home for the whole module: the steps build on each other."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.bento_server import bento_server
from tests.test_service import (CLASSES, REPO, class_images, encode, local_probabilities,
                                stage_env, write_ingested, write_tiny_model)

pytestmark = pytest.mark.slow


class Store:
    def __init__(self, root: Path):
        self.root, self.home = root, root / "bentoml"
        write_ingested(root / "ingested", 30, seed=7)

    def package(self, model_dir: Path, bentofile: Path = REPO / "bentofile.yaml"
                ) -> tuple[subprocess.CompletedProcess, dict | None]:
        out = model_dir.parent / f"{model_dir.name}.package.json"
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "package", "--model", str(model_dir),
             "--bentofile", str(bentofile), "--data", str(self.root / "ingested"), "--out", str(out)],
            cwd=REPO, env=stage_env(self.home), capture_output=True, text=True, timeout=180)
        return done, json.loads(out.read_text()) if out.exists() else None

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "package", *args], cwd=REPO,
                              env=stage_env(self.home), capture_output=True, text=True, timeout=60)

    def record(self) -> dict:
        return json.loads((self.home / "kiln" / "champion.json").read_text())

    def versions(self, kind: str, name: str) -> set[str]:
        folder = self.home / kind / name
        return {p.name for p in folder.iterdir() if p.name != "latest"} if folder.exists() else set()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("promotion"))


@pytest.fixture(scope="module")
def first(store):
    model_dir = store.root / "first"
    write_tiny_model(model_dir, seed=0)
    done, report = store.package(model_dir)
    assert done.returncode == 0, done.stderr
    return report


def test_first_model_is_promoted_on_thresholds_alone(store, first):
    assert first["promoted"] is True and first["champion_before"] is None
    assert first["challenger"]["accuracy"] == 1.0
    assert first["infra_validation"]["test_images"] == 30
    assert store.record() == {"champion": {**store.record()["champion"]}, "previous": []}
    assert store.record()["champion"]["bento_tag"] == first["bento_tag"]
    assert store.command("champion").stdout.strip() == first["bento_tag"]


def test_worse_challenger_is_not_packaged_and_the_champion_still_serves(store, first, tmp_path):
    models_before = store.versions("models", "kiln-classifier")
    worse = store.root / "worse"
    write_tiny_model(worse, steps=0, seed=3)  # untrained
    done, report = store.package(worse)
    assert done.returncode == 0, done.stderr
    assert report["promoted"] is False and "champion keeps serving" in report["reason"]
    assert report["challenger"]["accuracy"] < report["champion_before"]["accuracy_now"] == 1.0
    assert report["bento_tag"] == first["bento_tag"]
    assert store.record()["champion"]["bento_tag"] == first["bento_tag"]
    assert store.versions("models", "kiln-classifier") == models_before  # nothing stored

    images, labels = class_images(6, seed=8)
    champion_bento = store.command("champion").stdout.strip()
    with bento_server(champion_bento, store.home, tmp_path / "serve.log") as (client, _):
        served = [client.post("/classify", files={"image": ("x.png", encode(image, "PNG"))}
                              ).json()["index"] for image in images]
    assert served == labels.tolist()


def broken_build_context(root: Path, replace: tuple[str, str]) -> Path:
    """A copy of the Bento's sources with one edit to pipeline/service.py."""
    for name in ("bentofile.yaml", "pipeline/__init__.py", "pipeline/preprocess.py",
                 "pipeline/service.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, root / name)
    service = (root / "pipeline/service.py").read_text()
    assert replace[0] in service
    (root / "pipeline/service.py").write_text(service.replace(*replace, 1))
    return root / "bentofile.yaml"


@pytest.mark.parametrize("case, replace, message", [
    ("answers differ",  # the server inverts the pixels: it runs, but answers wrongly
     ("logits = session.run([\"logits\"], {\"input\": self.preprocessing.normalize(pixels)})",
      "logits = session.run([\"logits\"], {\"input\": self.preprocessing.normalize(255 - pixels)})"),
     "differs from the evaluated model"),
    ("never ready",  # the self-check fails, so the worker never starts
     ("self.ready = True", "raise RuntimeError('broken on purpose')"),
     "before it was ready"),
])
def test_failed_infra_validation_blocks_promotion(store, first, tmp_path, case, replace, message):
    record = store.record()
    models_before = store.versions("models", "kiln-classifier")
    bentos_before = store.versions("bentos", "kiln")
    challenger = tmp_path / "challenger"
    write_tiny_model(challenger, seed=1)
    done, report = store.package(challenger, broken_build_context(tmp_path / "ctx", replace))
    assert done.returncode == 1, done.stdout
    assert "kiln package: error: infra validation: " in done.stderr and message in done.stderr
    assert report is None
    assert store.record() == record  # the champion stays
    assert store.versions("models", "kiln-classifier") == models_before  # the failed one removed
    assert store.versions("bentos", "kiln") == bentos_before


def test_equal_challenger_is_promoted_and_rollback_restores_the_previous(store, first):
    second = store.root / "second"
    write_tiny_model(second, seed=1)
    done, report = store.package(second)
    assert done.returncode == 0, done.stderr
    assert report["promoted"] is True and report["bento_tag"] != first["bento_tag"]
    assert store.record()["champion"]["bento_tag"] == report["bento_tag"]
    assert [c["bento_tag"] for c in store.record()["previous"]][-1] == first["bento_tag"]

    done = store.command("rollback")
    assert done.returncode == 0, done.stderr
    assert first["model_tag"] in done.stdout
    assert store.command("champion").stdout.strip() == first["bento_tag"]
    assert store.record()["previous"] == []
    # The restored champion's model is the first one, byte for byte.
    name, version = first["model_tag"].split(":")
    stored = store.home / "models" / name / version
    assert (stored / "model.onnx").read_bytes() == (store.root / "first" / "model.onnx").read_bytes()
    assert yaml.safe_load((stored / "model.yaml").read_text())["labels"]["accuracy"] == "1.0000"

    done = store.command("rollback")
    assert done.returncode == 1 and "no previous champion to roll back to" in done.stderr
    assert local_probabilities(stored, class_images(3, 9)[0][:, None]).shape == (3, len(CLASSES))
