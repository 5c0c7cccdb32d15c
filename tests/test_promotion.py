"""Champion and challenger, as a user observes them: the package stage (as dvc.yaml runs it, with
the real params.yaml) promotes a first model, refuses a worse one, refuses one whose served
answers differ from the evaluated ones (infra validation), does not promote an identical one
again, promotes an equal one; after `rollback` the server answers with the old model's
probabilities; a SIGKILLed package stage leaves no process behind and the champion serving; a
data set with other classes gets its own champion line. One BentoML home for the module: the
steps build on each other, in file order."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.bento_server import bento_server
from tests.test_service import (CLASSES, REPO, class_images, encode,
                                local_probabilities, run_package, stage_env, write_ingested,
                                write_tiny_model)

pytestmark = pytest.mark.slow


class Store:
    """A BentoML home and the ingested test split the package stage scores on."""

    def __init__(self, root: Path):
        self.root, self.home = root, root / "bentoml"
        self.ingested = root / "ingested"
        write_ingested(self.ingested, 30, seed=7)

    def package(self, model_dir: Path, bentofile: Path = REPO / "bentofile.yaml"):
        return run_package(model_dir, self.ingested, self.home, bentofile)

    def champion_command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.champion", *args], cwd=REPO,
                              env=stage_env(self.home), capture_output=True, text=True, timeout=60)

    def line(self) -> dict:
        (path,) = (self.home / "kiln" / "champions").glob("*.json")
        return json.loads(path.read_text())

    def versions(self, kind: str, name: str) -> set[str]:
        folder = self.home / kind / name
        return {p.name for p in folder.iterdir() if p.name != "latest"} if folder.exists() else set()

    def served_probabilities(self, bento_tag: str, log: Path, images: np.ndarray) -> np.ndarray:
        """What the Bento answers for `images`, each uploaded as a PNG to /classify."""
        with bento_server(bento_tag, self.home, log) as (client, _):
            answers = [client.post("/classify", files={"image": ("x.png", encode(image, "PNG"))})
                       for image in images]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return np.array([[a.json()["probabilities"][c] for c in CLASSES] for a in answers])


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


# The command lines of an infra-validation server: watchdog, arbiter and workers.
SERVER = ("pipeline.serving", "bentoml serve kiln:", "_bentoml_impl.worker.service kiln:")


def kiln_processes(home: Path, *needles: str) -> list[psutil.Process]:
    """Live processes of the BentoML home `home` (their environment's BENTOML_HOME: other Kiln
    servers on the machine are not this test's) whose command line contains any of `needles`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["status"] == psutil.STATUS_ZOMBIE or not any(n in cmdline for n in needles):
            continue
        try:
            if process.environ().get("BENTOML_HOME") == str(home):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # gone meanwhile, or another user's
    return found


def test_first_model_is_promoted_on_thresholds_alone(store, first):
    assert first["challenger_serves"] is True
    assert first["challenger"]["accuracy"] == 1.0
    line = store.line()
    assert line["champion"]["bento_tag"] == first["champion"]["bento_tag"]
    assert line["previous"] == []
    assert line["task"] == {"model_name": "kiln-classifier", "classes": CLASSES}
    report = store.root / "first.package.json"
    done = store.champion_command("bento", "--report", str(report), "--export", "unused")
    assert done.stdout.strip() == first["champion"]["bento_tag"], done.stderr


def test_worse_challenger_is_not_packaged_and_the_champion_still_serves(store, first, tmp_path):
    models_before = store.versions("models", "kiln-classifier")
    worse = store.root / "worse"
    write_tiny_model(worse, steps=0, seed=3)  # untrained
    done, report = store.package(worse)
    assert done.returncode == 0, done.stderr
    assert "champion keeps serving" in done.stdout and report["challenger_serves"] is False
    assert report["challenger"]["accuracy"] < report["champion"]["accuracy"] == 1.0
    assert report["champion"]["bento_tag"] == first["champion"]["bento_tag"]
    assert store.line()["champion"]["bento_tag"] == first["champion"]["bento_tag"]
    assert store.versions("models", "kiln-classifier") == models_before  # nothing stored

    images, _ = class_images(6, seed=8)
    served = store.served_probabilities(first["champion"]["bento_tag"], tmp_path / "serve.log", images)
    assert served == pytest.approx(local_probabilities(store.root / "first", images[:, None]), abs=1e-6)


def test_an_identical_challenger_is_not_promoted_again(store, first):
    line = store.line()
    bentos, models = store.versions("bentos", "kiln"), store.versions("models", "kiln-classifier")
    again = store.root / "first-again"
    shutil.copytree(store.root / "first", again)
    done, report = store.package(again)
    assert done.returncode == 0, done.stderr
    assert "the challenger is the champion already" in done.stdout
    assert report["challenger_serves"] is True
    assert report["champion"] == first["champion"]
    assert store.line() == line  # no new champion, no history entry
    assert store.versions("bentos", "kiln") == bentos
    assert store.versions("models", "kiln-classifier") == models


def broken_build_context(root: Path, replace: tuple[str, str]) -> Path:
    """A copy of the Bento's sources with one edit to pipeline/service.py."""
    import yaml

    bentofile = REPO / "bentofile.yaml"
    for name in ["bentofile.yaml", *yaml.safe_load(bentofile.read_text())["include"]]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, root / name)
    service = (root / "pipeline/service.py").read_text()
    assert replace[0] in service
    (root / "pipeline/service.py").write_text(service.replace(*replace, 1))
    return root / "bentofile.yaml"


@pytest.mark.parametrize("case, replace, message", [
    ("answers differ",  # the server inverts the pixels: it runs, but answers wrongly
     ("return softmax(predict(self.model_input(batch)))",
      "return softmax(predict(self.model_input(255 - batch)))"),
     "differs from the evaluated model"),
    ("never ready",  # the self-check fails, so the worker never starts
     ("self.ready = True", "raise RuntimeError('broken on purpose')"),
     "failed to start before it was ready"),
])
def test_failed_infra_validation_blocks_promotion(store, first, tmp_path, case, replace, message):
    line = store.line()
    models_before = store.versions("models", "kiln-classifier")
    bentos_before = store.versions("bentos", "kiln")
    challenger = tmp_path / "challenger"
    write_tiny_model(challenger, seed=1)
    done, report = store.package(challenger, broken_build_context(tmp_path / "ctx", replace))
    assert done.returncode == 1, done.stdout
    assert "kiln package: error: " in done.stderr and message in done.stderr
    assert report is None
    assert store.line() == line  # the champion stays
    assert store.versions("models", "kiln-classifier") == models_before  # the failed one removed
    assert store.versions("bentos", "kiln") == bentos_before
    assert kiln_processes(store.home, *SERVER) == []  # its server is gone


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("kill_point", ["model stored", "validation server up"])
def test_a_killed_package_stage_leaves_no_process_and_the_champion_serving(
        store, first, tmp_path, kill_point):
    line = store.line()
    models_before = store.versions("models", "kiln-classifier")
    challenger = tmp_path / "challenger"
    write_tiny_model(challenger, seed=2)
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "package", "--model", str(challenger), "--bentofile",
         str(REPO / "bentofile.yaml"), "--data", str(store.ingested), "--reference",
         str(store.ingested / "profile.json"), "--export", str(tmp_path / "bento"),
         "--out", str(tmp_path / "package.json")],
        cwd=REPO, env=stage_env(store.home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if kill_point == "model stored":
            wait_for(lambda: store.versions("models", "kiln-classifier") - models_before, 120,
                     "the challenger in the model store")
        else:
            wait_for(lambda: kiln_processes(store.home, "_bentoml_impl.worker.service kiln:"), 120,
                     "the infra-validation server's workers")
        stage.send_signal(signal.SIGKILL)
    finally:
        stage.wait()
    # The server (watchdog, arbiter and workers) follows the stage within its stop grace.
    wait_for(lambda: not kiln_processes(store.home, *SERVER), 30, "no serving process left")
    assert store.line() == line
    assert not (tmp_path / "package.json").exists()

    images, _ = class_images(20, seed=12)
    served = store.served_probabilities(line["champion"]["bento_tag"], tmp_path / "serve.log", images)
    assert served == pytest.approx(local_probabilities(store.root / "first", images[:, None]), abs=1e-6)

    # The next run deletes what the killed one left, then does its job.
    done, report = store.package(challenger)
    assert done.returncode == 0, done.stderr
    assert "left by a killed package run" in done.stdout
    assert report["challenger_serves"] is True
    done = store.champion_command("rollback", "--report", str(challenger.with_suffix(".package.json")))
    assert done.returncode == 0, done.stderr
    assert store.line() == line


def test_rollback_serves_the_previous_models_probabilities(store, first, tmp_path):
    """Promote A (first), promote B (equal accuracy), roll back: the server answers with A's
    probabilities, computed here with ONNX Runtime from A's own files."""
    b_dir = store.root / "second"
    write_tiny_model(b_dir, seed=1)
    done, b = store.package(b_dir)
    assert done.returncode == 0, done.stderr
    assert b["challenger_serves"] is True and b["champion"]["bento_tag"] != first["champion"]["bento_tag"]

    # Noise: images neither model is sure about, so their probabilities differ visibly.
    images = np.random.default_rng(9).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    a_expected = local_probabilities(store.root / "first", images[:, None])
    b_expected = local_probabilities(b_dir, images[:, None])
    assert np.abs(a_expected - b_expected).max() > 1e-3  # two models a test can tell apart
    report = b_dir.with_suffix(".package.json")

    def served() -> np.ndarray:  # as `make serve` picks the Bento
        done = store.champion_command("bento", "--report", str(report), "--export", "unused")
        assert done.returncode == 0, done.stderr
        return store.served_probabilities(done.stdout.strip(), tmp_path / "serve.log", images)

    assert served() == pytest.approx(b_expected, abs=1e-6)
    pointer = tmp_path / "champion.json"  # `make rollback` passes dvc.yaml's, validate's dep
    done = store.champion_command("rollback", "--report", str(report), "--champion", str(pointer))
    assert done.returncode == 0, done.stderr
    assert first["champion"]["model_tag"] in done.stdout
    assert served() == pytest.approx(a_expected, abs=1e-6)
    named = json.loads(pointer.read_text())
    assert (named["model_tag"], named["bento_tag"]) == (first["champion"]["model_tag"],
                                                        first["champion"]["bento_tag"])

    done = store.champion_command("rollback", "--report", str(report))
    assert done.returncode == 1 and "no previous champion to roll back to" in done.stderr


def test_other_classes_start_their_own_line(store, first, tmp_path):
    """A model of another class list is the first champion of its own task: it is not scored
    against the digits-like line's champion, and that line is untouched."""
    from pipeline.card import read_card, write_card

    line = store.line()
    other = tmp_path / "other"
    write_tiny_model(other, steps=0, seed=5)  # poor: it would lose against the first champion
    card = read_card(other)
    renamed = ["circle", "square", "triangle"]
    write_card(other, card.__class__(**{**card.__dict__, "classes": renamed}))
    ingested = tmp_path / "ingested"
    shutil.copytree(store.ingested, ingested)
    (ingested / "classes.json").write_text(json.dumps(renamed))
    manifest = (ingested / "manifest.csv").read_text()
    for old, new in zip(CLASSES, renamed):
        manifest = manifest.replace(f",{old},", f",{new},")
    (ingested / "manifest.csv").write_text(manifest)

    done, report = run_package(other, ingested, store.home)
    assert done.returncode == 0, done.stderr
    assert "first champion of this task" in done.stdout and report["challenger_serves"] is True
    assert report["task"]["classes"] == renamed
    lines = sorted((store.home / "kiln" / "champions").glob("*.json"))
    assert len(lines) == 2
    assert json.loads(next(p for p in lines if "circle" in p.read_text()).read_text())[
        "champion"]["bento_tag"] == report["champion"]["bento_tag"]
    assert json.loads(next(p for p in lines if "circle" not in p.read_text()).read_text()) == line
    images, _ = class_images(3, seed=4)
    with bento_server(report["champion"]["bento_tag"], store.home, tmp_path / "serve.log") as (client, _):
        body = client.post("/classify", files={"image": ("x.png", encode(images[0], "PNG"))}).json()
    assert set(body["probabilities"]) == set(renamed)
