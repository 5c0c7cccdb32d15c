"""Champion and challenger, as a user observes them: the package stage (as dvc.yaml runs it, with
the real params.yaml) promotes a first model, refuses a worse one, refuses one whose served
answers differ from the evaluated ones (infra validation), does not promote an identical one
again, promotes an equal one; after `rollback` the server answers with the old model's
probabilities and the rolled-back model is not promoted again; a package stage that runs out of
disk leaves nothing half-built behind and the champion serving (killed: tests/test_pipeline.py); `make serve`'s lookup refuses a damaged or crafted export by name and repairs a
damaged store copy; a data set with other classes gets its own champion line. One workspace
(champion record and exported Bentos) and one BentoML home for the module: the steps build on
each other, in file order."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.core.card import sha256_file
from pipeline.core.dataset import write_items
from tests.bento_server import bento_server
from tests.ingested import items_of
from tests.tiny_bento import (CLASSES, REPO, class_images, encode, exported, local_probabilities,
                              run_package, stage_env, write_ingested, write_tiny_model)

pytestmark = pytest.mark.slow


class Store:
    """A workspace (the champion record and the exported Bentos, as dvc.yaml names them), a
    BentoML home and the ingested test split the package stage scores on."""

    def __init__(self, root: Path):
        self.root, self.home = root, root / "bentoml"
        self.record, self.exports = root / "champion.json", root / "champion"
        self.ingested = root / "ingested"
        write_ingested(self.ingested, 30, seed=7)

    def package(self, model_dir: Path, bentofile: Path = REPO / "bentofile.yaml", home=None):
        return run_package(model_dir, self.ingested, home or self.home, bentofile, self.root)

    def champion_command(self, *args: str, home: Path | None = None) -> subprocess.CompletedProcess:
        """`python -m pipeline.lifecycle.champion <args> --champion <record> --export <exports>`, as the
        Makefile runs it."""
        return subprocess.run([sys.executable, "-m", "pipeline.lifecycle.champion", *args, "--champion",
                               str(self.record), "--export", str(self.exports)], cwd=REPO,
                              env=stage_env(home or self.home), capture_output=True, text=True,
                              timeout=60)

    def served_bento(self, home: Path | None = None) -> str:
        """The Bento `make serve` would serve."""
        done = self.champion_command("bento", home=home)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def line(self) -> dict:
        record = json.loads(self.record.read_text())
        return record["lines"][record["serves"]]

    def workspace(self) -> dict[str, bytes]:
        """Every file of the record and the exports: what a failed run must leave as it was."""
        files = {p: p.read_bytes() for p in self.exports.rglob("*") if p.is_file()}
        return {**files, self.record: self.record.read_bytes()}

    def versions(self, kind: str, name: str) -> set[str]:
        folder = self.home / kind / name
        return {p.name for p in folder.iterdir() if p.name != "latest"} if folder.exists() else set()

    def served_probabilities(self, bento_tag: str, log: Path, images: np.ndarray,
                             home: Path | None = None) -> np.ndarray:
        """What the Bento answers for `images`, each uploaded as a PNG to /classify."""
        with bento_server(bento_tag, home or self.home, log) as (client, _):
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
SERVER = ("pipeline.lifecycle.local_server", "bentoml serve kiln:", "_bentoml_impl.worker.service kiln:")


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


def test_first_model_is_promoted_on_thresholds_alone(store, first, tmp_path):
    assert first["challenger_serves"] is True
    assert first["challenger"]["accuracy"] == 1.0
    line = store.line()
    bento_tag = first["champion"]["bento_tag"]
    assert line["champion"]["bento_tag"] == bento_tag
    assert line["previous"] == [] and line["retired"] == []
    assert line["task"] == {"model_name": "kiln-classifier", "classes": CLASSES}
    # Its Bento is exported beside a manifest that `sha256sum -c` checks.
    folder = exported(store.root, bento_tag)
    done = subprocess.run(["sha256sum", "--check", "--strict", "--quiet",
                           str(folder.with_name(folder.name + ".sha256"))],
                          cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # `make serve`'s lookup in an empty store (a fresh clone after `dvc pull`) imports it.
    empty = tmp_path / "empty-home"
    assert store.served_bento(home=empty) == bento_tag
    assert (empty / "bentos" / "kiln" / bento_tag.split(":")[1] / "bento.yaml").is_file()


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
    assert store.served_bento() == first["champion"]["bento_tag"]

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
    """A copy of the Bento's sources (every modality's) with one edit to
    pipeline/serving/service.py."""
    import yaml

    from pipeline.lifecycle.bento_build import modality_sources
    from pipeline.params import MODALITIES

    bentofile = REPO / "bentofile.yaml"
    for name in ["bentofile.yaml", *yaml.safe_load(bentofile.read_text())["include"],
                 *(f for m in MODALITIES for f in modality_sources(m))]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, root / name)
    service = (root / "pipeline/serving/service.py").read_text()
    assert replace[0] in service
    (root / "pipeline/serving/service.py").write_text(service.replace(*replace, 1))
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
    workspace = store.workspace()
    models_before = store.versions("models", "kiln-classifier")
    bentos_before = store.versions("bentos", "kiln")
    challenger = tmp_path / "challenger"
    write_tiny_model(challenger, seed=1)
    done, report = store.package(challenger, broken_build_context(tmp_path / "ctx", replace))
    assert done.returncode == 1, done.stdout
    assert "kiln package: error: " in done.stderr and message in done.stderr
    assert report is None
    assert store.workspace() == workspace  # the champion stays
    assert store.versions("models", "kiln-classifier") == models_before  # the failed one removed
    assert store.versions("bentos", "kiln") == bentos_before
    assert not any((store.home / "tmp").iterdir())  # no half-built Bento
    assert kiln_processes(store.home, *SERVER) == []  # its server is gone


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_rollback_serves_the_previous_models_probabilities(store, first, tmp_path):
    """Promote A (first), promote B (equal accuracy), roll back: the server answers with A's
    probabilities, computed here with ONNX Runtime from A's own files, and B is retired: the
    package stage does not promote it again."""
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

    def served() -> np.ndarray:  # as `make serve` picks the Bento
        return store.served_probabilities(store.served_bento(), tmp_path / "serve.log", images)

    assert served() == pytest.approx(b_expected, abs=1e-6)
    done = store.champion_command("rollback")
    assert done.returncode == 0, done.stderr
    assert first["champion"]["model_tag"] in done.stdout
    assert served() == pytest.approx(a_expected, abs=1e-6)
    line = store.line()
    assert line["champion"]["bento_tag"] == first["champion"]["bento_tag"]
    assert b["champion"]["model_tag"] in line["retired"]
    assert not exported(store.root, b["champion"]["bento_tag"]).exists()

    done, again = store.package(b_dir)
    assert done.returncode == 0, done.stderr
    assert "was rolled back from" in done.stdout and again["challenger_serves"] is False
    assert served() == pytest.approx(a_expected, abs=1e-6)

    done = store.champion_command("rollback")
    assert done.returncode == 1 and "no previous champion to roll back to" in done.stderr


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    ("flipped byte in model.onnx", r"model\.onnx: sha256 \w+ does not match"),
    ("flipped byte in service.py", r"src/pipeline/serving/service\.py: sha256 \w+ does not match"),
    ("README links out of the folder", r"README\.md: a symbolic link \(to .*secret"),
    ("a file the manifest does not list", r"extra\.py: not listed in"),
    ("a manifest path out of the folder", r"\.sha256:\d+: not `<sha256>  <relative path>`"),
])
def test_a_damaged_or_crafted_export_is_refused_by_name_and_nothing_is_imported(
        store, first, tmp_path, damage, message):
    """`make serve`'s lookup in a fresh clone (an empty BentoML home) of a workspace whose
    exported champion was damaged (a DVC cache object) or crafted: it exits non-zero naming the
    file, and imports nothing."""
    workspace = tmp_path / "workspace"
    shutil.copytree(store.root, workspace, ignore=shutil.ignore_patterns("bentoml"))
    bento_tag = store.line()["champion"]["bento_tag"]
    folder = exported(workspace, bento_tag)
    manifest = folder.with_name(folder.name + ".sha256")
    if damage == "flipped byte in model.onnx":
        _flip_a_byte(next(folder.glob("models/*/*/model.onnx")))
    elif damage == "flipped byte in service.py":
        _flip_a_byte(folder / "src/pipeline/serving/service.py")
    elif damage == "README links out of the folder":
        (tmp_path / "secret.txt").write_text("not for the API page\n")
        (folder / "README.md").unlink()
        (folder / "README.md").symlink_to(tmp_path / "secret.txt")
    elif damage == "a file the manifest does not list":
        (folder / "src/pipeline/extra.py").write_text("print('hello')\n")
    else:
        manifest.write_text(manifest.read_text() + f"{'0' * 64}  ../../secret.txt\n")
    empty = tmp_path / "empty-home"
    done = subprocess.run([sys.executable, "-m", "pipeline.lifecycle.champion", "bento", "--champion",
                           str(workspace / "champion.json"), "--export", str(workspace / "champion")],
                          cwd=REPO, env=stage_env(empty), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert re.search(message, done.stderr), done.stderr
    assert done.stderr.startswith("kiln champion: error: ") and done.stderr.count("\n") == 1
    assert not any((empty / "bentos").glob("*/*")) and not any((empty / "models").glob("*/*"))


def test_a_damaged_store_copy_is_imported_again_from_the_checked_export(store, first, tmp_path):
    line = store.line()
    stored = store.home / "models" / line["champion"]["model_tag"].replace(":", "/") / "model.onnx"
    _flip_a_byte(stored)
    done = store.champion_command("bento")
    assert done.returncode == 0, done.stderr
    assert "differed from" in done.stderr and "imported again" in done.stderr
    assert done.stdout.strip() == line["champion"]["bento_tag"]
    assert sha256_file(stored) == line["champion"]["weights_sha256"]


@pytest.fixture
def small_disk(tmp_path):
    """(size in KiB) -> a folder on a tmpfs of that size, unmounted afterwards. Needs root: fails
    in CI (which runs as root), skips elsewhere."""
    mounted = []

    def make(kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            reason = f"cannot mount a small tmpfs (root needed): {done.stderr.strip()}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def test_a_full_disk_names_the_cause_in_one_line_and_changes_nothing(store, first, tmp_path,
                                                                     small_disk):
    """ENOSPC where the package stage builds (the BentoML home) and where it exports (the
    workspace): one line naming the cause, nothing half-built, the champion serving."""
    challenger = tmp_path / "challenger"
    write_tiny_model(challenger, seed=4)
    workspace = store.workspace()

    home = small_disk(150)  # KiB: less than a model and its Bento
    done, _ = store.package(challenger, home=home)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("kiln package: error: no space left on the device while storing "
                           "kiln-classifier:") and "nothing was changed" in line
    assert store.workspace() == workspace
    assert [p for p in home.rglob("*") if p.is_file() and "prometheus" not in str(p)] == []

    # Room for the record and exports as they are (+64 KiB), not for a new Bento's folder.
    used = subprocess.run(["du", "-sk", str(store.exports), str(store.record)], check=True,
                          capture_output=True, text=True).stdout.split()[::2]  # KiB each
    size = sum(map(int, used)) + 64
    disk = small_disk(size)
    shutil.copy2(store.record, disk / "champion.json")
    shutil.copytree(store.exports, disk / "champion")
    before = {p: p.read_bytes() for p in disk.rglob("*") if p.is_file()}
    done, _ = run_package(challenger, store.ingested, store.home, REPO / "bentofile.yaml", disk)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "kiln package: error: no space left on the device while exporting kiln:")
    assert {p: p.read_bytes() for p in disk.rglob("*") if p.is_file()} == before
    assert store.served_bento() == first["champion"]["bento_tag"]


def test_other_classes_start_their_own_line(store, first, tmp_path):
    """A model of another class list is the first champion of its own task: it is not scored
    against the digits-like line's champion, and that line is untouched."""
    from pipeline.core.card import read_card, write_card

    line = store.line()
    other = tmp_path / "other"
    write_tiny_model(other, steps=0, seed=5)  # poor: it would lose against the first champion
    card = read_card(other)
    renamed = ["circle", "square", "triangle"]
    write_card(other, card.__class__(**{**card.__dict__, "classes": renamed}))
    ingested = tmp_path / "ingested"
    new_name = dict(zip(CLASSES, renamed))
    write_items(ingested, [({**row, "label": new_name[row["label"]]}, data)
                           for row, data in items_of(store.ingested)], renamed)

    done, report = run_package(other, ingested, store.home, workspace=store.root)
    assert done.returncode == 0, done.stderr
    assert "first champion of this task" in done.stdout and report["challenger_serves"] is True
    assert report["task"]["classes"] == renamed
    record = json.loads(store.record.read_text())
    assert len(record["lines"]) == 2
    assert store.line()["champion"]["bento_tag"] == report["champion"]["bento_tag"]
    assert [v for k, v in record["lines"].items() if k != record["serves"]] == [line]
    assert exported(store.root, line["champion"]["bento_tag"]).is_dir()  # still rollback-able
    images, _ = class_images(3, seed=4)
    with bento_server(store.served_bento(), store.home, tmp_path / "serve.log") as (client, _):
        body = client.post("/classify", files={"image": ("x.png", encode(images[0], "PNG"))}).json()
    assert set(body["probabilities"]) == set(renamed)
