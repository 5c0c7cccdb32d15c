"""The whole pipeline on the built-in digits, in a temporary git copy of the repo with the real
params.yaml shrunk, checked as a DVC, Prefect and BentoML user observes it: what `dvc repro`
reruns (nothing; exactly the stages a changed shared module runs; the same dvc.lock apart from
timing), the Prefect flow over the same workspace, the champion served over HTTP, experiments
and a push/pull to a fresh clone that serves the pulled champion, a corrupted weights file
refused by name, and failed runs (drift, a truncated file) and a data set of other classes (no
drift check) that leave the champion serving.
The tests build on each other, in file order."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.core.import_closure import source_files
from tests.bento_server import bento_server
from tests.conftest import merged
from tests.ingested import items_of
from tests.browser import offline_page
from tests.project import copy_repo, dvc, git, project_env, ran_stages, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "validate", "augment", "train", "compress", "evaluate", "package"]
TIMING = {"reports/latency.json", "reports/plots/latency.csv"}  # dvc.yaml declares these timing
# The README's way to compare experiments, read from it so the two cannot drift apart.
EXP_SHOW = shlex.split(next(line.split("#")[0] for line in (REPO / "README.md").read_text()
                            .splitlines() if line.startswith("dvc exp show")))


def edit_params(project: Path, changes: dict) -> None:
    """`changes` (nested as params.yaml) merged into project's params.yaml."""
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merged(yaml.safe_load(path.read_text()), changes),
                                   sort_keys=False))


def lock_hashes(project: Path) -> dict[tuple[str, str], str]:
    """(stage, path) -> md5 of every dep and out in dvc.lock."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {(stage, entry["path"]): entry["md5"] for stage, spec in stages.items()
            for entry in spec.get("deps", []) + spec.get("outs", [])}


def champion(project: Path) -> dict:
    """The champion the workspace names (reports/champion.json, the package stage's record)."""
    record = json.loads((project / "reports/champion.json").read_text())
    return record["lines"][record["serves"]]["champion"]


def served_bento(project: Path) -> str:
    """The Bento `make serve` serves (its lookup, as the Makefile runs it)."""
    return run(project, sys.executable, "-m", "pipeline.lifecycle.champion", "bento", "--champion",
               "reports/champion.json", "--export", "models/champion").stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory, params_writer) -> Path:
    """A copy of the repo, reproduced once with `dvc repro` on the shrunk params and committed:
    the first run promotes the first champion, and then `dvc status` has nothing to say
    (test_second_repro_is_a_noop: nor does `dvc repro`)."""
    root = copy_repo(tmp_path_factory.mktemp("kiln"))
    params_writer(root)
    done = dvc(root, "repro")
    assert ran_stages(done.stdout) == STAGES
    assert "drift not checked" in done.stdout
    assert json.loads(dvc(root, "status", "--json").stdout) == {}
    git(root, "add", "-A")
    git(root, "commit", "-qm", "repro")
    return root


def test_repro_produces_every_artifact(project):
    evaluation = json.loads((project / "reports/evaluation.json").read_text())
    assert set(evaluation["accuracy"]) == {"float_torch", "float_onnx", "pruned_onnx", "int8_onnx",
                                           "baseline_logreg"}  # the servable baseline
    details = json.loads((project / "reports/evaluation_details.json").read_text())
    selected = evaluation["selected"]
    assert details["variants"][selected]["eligible"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    baselines = [v["accuracy"] for k, v in evaluation.items() if k.startswith("baseline_")]
    assert evaluation["accuracy"][selected] >= max(baselines) + params["gate"]["baseline_margin"]
    card = json.loads((project / "models/selected/model.json").read_text())
    assert card["selection"]["variant"] == selected and card["classes"] == [str(d) for d in range(10)]
    assert card["recipe"]["section"]["train"]["max_epochs"] == params["image"]["train"]["max_epochs"]
    assert json.loads((project / "reports/validation.json").read_text())["success"] is True
    assert (project / "reports/data_docs/index.html").exists()
    epochs = json.loads((project / "reports/train/metrics.json").read_text())["epochs_run"]
    assert len((project / "reports/train/plots/metrics/val_acc.tsv").read_text().splitlines()) == epochs + 1
    report = json.loads((project / "reports/package.json").read_text())
    assert report["challenger_serves"] and report["champion"]["bento_tag"].startswith("kiln:")
    assert champion(project)["bento_tag"] == report["champion"]["bento_tag"]
    bento = report["champion"]["bento_tag"].replace(":", "-")
    assert (project / "models/champion" / bento / "bento.yaml").exists()
    assert (project / "models/champion" / f"{bento}.sha256").exists()
    # Committed to git, as DVC users expect: metrics, plots, the package report and the
    # champion record.
    tracked = git(project, "ls-files", "reports").stdout.split()
    assert {"reports/validation.json", "reports/evaluation.json", "reports/latency.json",
            "reports/train/metrics.json", "reports/plots/confusion.csv",
            "reports/package.json", "reports/champion.json"} <= set(tracked)
    assert not any(name.startswith("reports/data_docs/") for name in tracked)  # in the DVC cache


def test_dvc_plots_draw_with_no_network(project, tmp_path):
    """`dvc plots show` (the committed self-contained template, .dvc/config), opened in Chromium
    with the network off: vega draws every plot and the page requests nothing outside."""
    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    html = tmp_path / "plots" / "index.html"
    plots = html.read_text().count("vegaEmbed(")
    assert plots >= 5  # training curves, confusion, three trade-off scatters
    page = offline_page(html.as_uri(), tmp_path / "browser")
    assert page.requests == []
    drawn = re.findall(r'<canvas width="(\d+)" height="(\d+)" class="marks"', page.dom)
    assert len(drawn) == plots and all(int(w) > 0 and int(h) > 0 for w, h in drawn)


def test_data_docs_draw_with_no_network(project, tmp_path):
    """The Data Docs, opened in Chromium with the network off: bootstrap-table fills the index's
    run list (one row per validation) and every table of each validation page, status icons
    are there with their font, and no page requests anything from outside."""
    docs = project / "reports/data_docs"
    validations = sorted(docs.glob("validations/*/*/*/*.html"))
    assert len(validations) >= 3  # images, classes, class_counts
    index = offline_page((docs / "index.html").as_uri(), tmp_path / "index")
    assert index.requests == []
    runs = re.search(r'<table[^>]*ge-index-page-validation-results-table.*?</table>', index.dom,
                     re.DOTALL)
    assert runs and len(re.findall(r'<tr[^>]*data-index="\d+"', runs[0])) == len(validations)
    for i, html in enumerate(validations):
        page = offline_page(html.as_uri(), tmp_path / f"validation{i}")
        assert page.requests == []
        tables = html.read_text().count('data-toggle="table"')
        assert tables and page.dom.count('<div class="bootstrap-table') == tables, html
        assert 'data-index="0"' in page.dom and "fa-check-circle" in page.dom, html
        for resource in local_resources(html, page.dom):
            assert resource.is_file(), f"{html}: {resource} missing"


def local_resources(page: Path, dom: str) -> list[Path]:
    """The files a page's DOM loads (scripts, stylesheets, images) and the fonts and images
    those stylesheets load, resolved against the page's folder."""
    refs = re.findall(r'<(?:script|img)[^>]*\bsrc="([^"]+)"|<link[^>]*\bhref="([^"]+)"', dom)
    files = [(page.parent / (a or b)).resolve() for a, b in refs]
    for css in [f for f in files if f.suffix == ".css" and f.is_file()]:
        files += [(css.parent / url).resolve() for url in
                  re.findall(r"url\(['\"]?(?!data:)([^'\")?#]+)", css.read_text())]
    return files


def test_second_repro_is_a_noop(project):
    lock = (project / "dvc.lock").read_text()
    done = dvc(project, "repro")
    assert ran_stages(done.stdout) == []
    assert "Data and pipelines are up to date" in done.stdout
    assert (project / "dvc.lock").read_text() == lock


def test_another_modalitys_code_and_params_rerun_no_stage(project):
    """An image run's stages depend on pipeline/modalities/image/ and no other modality's code
    (dvc.yaml: pipeline/modalities/${data.modality}), nor on another modality's params section
    (${data.modality}.train, ...); Python's bytecode caches are no dep."""
    others = ["pipeline/modalities/audio/decode.py", "pipeline/modalities/text/serving.py"]
    for name in others:
        with open(project / name, "a") as f:
            f.write("# another modality's code changed\n")
    # what Python writes beside the image code when bytecode caching is on (PYTHONDONTWRITEBYTECODE
    # unset): a fresh clone has none of it, so it is no dep (.dvcignore)
    cache = project / "pipeline/modalities/image/__pycache__/checks.cpython-311.pyc"
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(b"bytecode")
    params = (project / "params.yaml").read_text()
    edit_params(project, {"audio": {"train": {"max_epochs": 3}, "serve": {"max_seconds": 2.0}},
                          "text": {"ingest": {"source": "elsewhere"},
                                   "preprocess": {"vocab_size": 500}}})
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
    (project / "params.yaml").write_text(params)
    git(project, "checkout", "--", *others)
    cache.unlink()


def test_a_changed_shared_module_reruns_exactly_its_stages_and_the_same_outputs(project):
    """pipeline/core/progress.py (the long stages' progress lines; not in the Bento): a change reruns
    every stage that runs it and no other, and with a change that does not alter behaviour
    every output (bar the declared timing files) is the same as before: the champion is not
    promoted again."""
    shared = "pipeline/core/progress.py"
    runs_it = [s for s in STAGES if REPO / shared in source_files("pipeline.stages.__main__",
                                                                   f"pipeline.stages.{s}")]
    assert runs_it == ["compress", "evaluate", "package"]
    before = lock_hashes(project)
    with open(project / shared, "a") as f:
        f.write("# a comment changes the file's hash, not what it does\n")
    done = dvc(project, "repro")
    assert ran_stages(done.stdout) == runs_it
    after = lock_hashes(project)
    changed = {path for (stage, path), md5 in before.items() if after[stage, path] != md5}
    assert changed == {shared} | TIMING
    assert "the challenger is the champion already" in done.stdout
    git(project, "commit", "-qam", "shared module changed")


def test_served_accuracy_equals_evaluated(project, tmp_path):
    """Every test image, uploaded as its PNG file, through the champion's Bento."""
    evaluation = json.loads((project / "reports/evaluation.json").read_text())
    bento_tag = served_bento(project)
    rows = items_of(project / "data/ingested", "test")
    with bento_server(bento_tag, project / ".bentoml", tmp_path / "serve.log") as (client, _):
        correct = 0
        for row, image in rows:
            response = client.post("/classify", files={"image": ("digit.png", image, "image/png")})
            assert response.status_code == 200, response.text
            correct += response.json()["label"] == row["label"]
    served = correct / len(rows)
    assert len(rows) == 359
    assert served == pytest.approx(evaluation["accuracy"][evaluation["selected"]], abs=1e-5)


def test_prefect_flow_reruns_what_dvc_says_and_publishes(project, prefect_harness):
    """The flow over the same workspace: a changed param reruns its stage and those after it,
    and the flow leaves the pipeline as up to date as `dvc repro` would."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                ArtifactFilterKey)

    from flows.kiln import kiln_pipeline

    runs = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["latency_runs"]
    edit_params(project, {"evaluate": {"latency_runs": runs + 1}})
    before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    state = kiln_pipeline(project_dir=project, return_state=True)
    assert state.is_completed(), state.message
    bento_tag = state.result()
    assert bento_tag == json.loads((project / "reports/package.json").read_text())["champion"]["bento_tag"]
    after = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert [s for s in before if before[s] != after[s]] == ["evaluate"]  # the same champion
    assert ran_stages(dvc(project, "repro").stdout) == []
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["kiln-evaluation"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert bento_tag in artifact.data and "int8_onnx" in artifact.data
    git(project, "commit", "-qam", "latency runs")


def test_gate_failure_stops_before_package(project):
    package_json = (project / "reports/package.json").read_text()
    edit_params(project, {"gate": {"min_accuracy": 1.0, "max_accuracy_drop": 0.0}})
    try:
        done = dvc(project, "repro", check=False)
        assert done.returncode != 0
        assert "kiln evaluate: error: gate: no variant is eligible" in done.stderr + done.stdout
        assert "= gate.min_accuracy 1 (params.yaml gate.min_accuracy)" in done.stderr  # the key
        assert "package" not in ran_stages(done.stdout)
        assert (project / "reports/package.json").read_text() == package_json
    finally:
        # Back to the committed state without rerunning: the failed stage wrote no dvc.lock
        git(project, "checkout", "params.yaml", "reports")
        dvc(project, "checkout")
    assert git(project, "status", "--porcelain").stdout == ""
    assert json.loads(dvc(project, "status", "--json").stdout) == {}


def test_a_pulled_clone_is_up_to_date_serves_the_champion_and_runs_experiments(project, tmp_path):
    """Share a run the DVC way: a local-folder remote, `dvc push`, a fresh `git clone` and
    `dvc pull`. Then nothing reruns, `make serve`'s champion lookup imports the pulled Bento
    into the clone's empty BentoML home and it serves. An experiment in its own temporary
    workspace (`--temp`, as a queued one runs) that promotes its model does not change what the clone serves until `dvc exp
    apply` brings it in; `dvc exp diff` / `dvc metrics diff` / `dvc params diff` then show the
    change."""
    dvc(project, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    git(project, "commit", "-qam", "remote")
    dvc(project, "push")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    dvc(clone, "pull")
    done = dvc(clone, "repro")
    assert ran_stages(done.stdout) == [] and "Data and pipelines are up to date" in done.stdout
    assert not (clone / ".bentoml").exists()

    before = champion(clone)
    assert served_bento(clone) == before["bento_tag"]  # imported into an empty store
    test = items_of(clone / "data/ingested", "test")[:20]
    images = [png for _, png in test]

    def served() -> tuple[list[str], np.ndarray]:
        with bento_server(served_bento(clone), clone / ".bentoml", tmp_path / "serve.log") as (client, _):
            answers = [client.post("/classify", files={"image": ("x.png", png)}).json()
                       for png in images]
        return ([a["label"] for a in answers],
                np.array([[a["probabilities"][str(d)] for d in range(10)] for a in answers]))

    labels, probabilities = served()
    assert np.mean([label == row["label"] for label, (row, _) in zip(labels, test)]) >= 0.9

    epochs = yaml.safe_load((clone / "params.yaml").read_text())["image"]["train"]["max_epochs"]
    # --temp: the experiment in a temporary workspace of its own, as a queued one runs, without
    # the queue's worker start (18 s)
    done = dvc(clone, "exp", "run", "--temp", "-n", "longer", "-S",
               f"image.train.max_epochs={epochs + 2}", "-S", "package.champion_tolerance=0.5")
    assert "promoted kiln:" in done.stdout  # inside the experiment's own workspace
    assert git(clone, "status", "--porcelain").stdout == ""  # the clone's workspace untouched
    assert champion(clone) == before
    assert served()[1] == pytest.approx(probabilities, abs=1e-7)

    dvc(clone, "exp", "apply", "longer")
    after = champion(clone)
    assert after["model_tag"] != before["model_tag"]
    assert served_bento(clone) == after["bento_tag"]
    assert np.abs(served()[1] - probabilities).max() > 1e-4  # the experiment's model serves
    assert json.loads(dvc(clone, "status", "--json").stdout) == {}

    diff = json.loads(dvc(clone, "exp", "diff", "--json").stdout)
    accuracy = diff["metrics"]["reports/evaluation.json"]["accuracy.float_torch"]
    assert accuracy["old"] != accuracy["new"]
    assert diff["params"]["params.yaml"]["image.train.max_epochs"] == {"old": epochs, "new": epochs + 2,
                                                                  "diff": 2}
    assert "accuracy.float_torch" in dvc(clone, "metrics", "diff").stdout
    assert "image.train.max_epochs" in dvc(clone, "params", "diff").stdout
    plots = json.loads(dvc(clone, "plots", "diff", "--json").stdout)
    assert "reports/plots/confusion.csv" in json.dumps(plots)
    # The README's comparison, in a 200-column terminal: every column whole.
    shown = subprocess.run([sys.executable, "-m", "dvc", *EXP_SHOW[1:], "--no-pager"],
                           cwd=clone, env={**project_env(clone), "COLUMNS": "200"},
                           capture_output=True, text=True, check=True).stdout
    assert "image.train.max_epochs" in shown and "accuracy.float_torch" in shown and "…" not in shown, shown


def test_a_killed_package_run_leaves_the_champion_serving_and_no_process(project, tmp_path):
    """DVC deletes a stage's outputs before it runs it; the champion record and the exported
    Bentos are `persist: true`, so a package stage killed mid-run (`kill -9` of `dvc repro` and
    its stage, once its new Bento is stored and under infra validation) leaves them whole:
    `make serve` serves the same champion, the validation server follows the stage (its
    watchdog), and the next repro deletes what the killed run stored and finishes the job."""
    from tests.test_promotion import SERVER, kiln_processes, wait_for

    before = champion(project)
    record = (project / "reports/champion.json").read_bytes()
    home = project / ".bentoml"
    edit_params(project, {"serve": {"access_log": True}})  # a new Bento: package reruns
    try:
        stage = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "package"],
                                 cwd=project, env=project_env(project), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: kiln_processes(home, "_bentoml_impl.worker.service kiln:"), 120,
                     "the infra-validation server's workers")
        finally:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
        wait_for(lambda: not kiln_processes(home, *SERVER), 30, "no serving process left")
        assert (project / "reports/champion.json").read_bytes() == record
        assert served_bento(project) == before["bento_tag"]
        with bento_server(before["bento_tag"], home, tmp_path / "serve.log") as (client, _):
            png = items_of(project / "data/ingested", "test")[0][1]
            assert client.post("/classify", files={"image": ("x.png", png)}).status_code == 200
    finally:
        git(project, "checkout", "params.yaml")
    done = dvc(project, "repro")
    assert "package" in ran_stages(done.stdout)
    assert "left by a killed package run" in done.stdout
    assert champion(project) == before and json.loads(dvc(project, "status", "--json").stdout) == {}


def test_a_corrupted_weights_file_is_refused_by_name(project):
    """A damaged DVC cache object: `dvc checkout` restores it silently and DVC calls it up to
    date, but the next stage that reads it refuses it, naming the file."""
    weights = project / "models/float/model.safetensors"
    md5 = run(project, "md5sum", str(weights)).stdout.split()[0]
    cached = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    original = cached.read_bytes()
    cached.chmod(0o644)
    try:
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        cached.write_bytes(bytes(damaged))
        weights.unlink()
        dvc(project, "checkout", "models/float")
        assert weights.read_bytes() == bytes(damaged)
        done = dvc(project, "repro", "--single-item", "--force", "evaluate", check=False)
        assert done.returncode != 0
        assert ("kiln evaluate: error: models/float/model.safetensors: sha256"
                in done.stdout + done.stderr)
    finally:
        cached.write_bytes(original)
        weights.unlink()
        git(project, "checkout", "reports")
        dvc(project, "checkout")
    assert json.loads(dvc(project, "status", "--json").stdout) == {}


def test_failed_runs_and_other_classes_leave_the_champion_serving(project, tmp_path):
    """On the reproduced project and its champion: a run on inverted digits fails on drift;
    three digits under other class names are another task (validate checks no drift against
    the digits champion). The champion's Bento still serves the same predictions afterwards.
    The user folders are small: drift compares shares, not counts. (A run that stops on a
    truncated file: tests/test_bad_data.py.)"""
    from PIL import ImageOps
    from sklearn.datasets import load_digits

    bento_tag = served_bento(project)
    probe = [png for _, png in items_of(project / "data/ingested", "test")[:20]]

    def predictions(log: Path) -> list[dict]:
        with bento_server(bento_tag, project / ".bentoml", log) as (client, _):
            answers = [client.post("/classify", files={"image": ("digit.png", png, "image/png")})
                       for png in probe]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return [a.json() for a in answers]

    def user_folder(name: str, change) -> Path:
        """40 ingested digits per class as a user's <class>/<file> folder, `change` applied."""
        folder = tmp_path / name
        for label in range(10):
            (folder / str(label)).mkdir(parents=True)
            for row, png in [(r, b) for r, b in items_of(project / "data/ingested")
                             if r["label"] == str(label)][:40]:
                with Image.open(io.BytesIO(png)) as image:
                    change(image).save(folder / str(label) / Path(row["id"]).name)
        return folder

    before = predictions(tmp_path / "serve_before.log")
    inverted = user_folder("inverted", ImageOps.invert)
    shapes = tmp_path / "shapes"
    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images[:300], digits.target[:300])):
        if target < 3:
            folder = shapes / ["zero", "one", "two"][target]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8)).save(folder / f"{i}.png")
    try:
        edit_params(project, {"image": {"ingest": {"source": str(inverted)}}})
        failed = dvc(project, "repro", check=False)
        assert failed.returncode != 0
        assert ran_stages(failed.stdout) == ["ingest", "validate"]
        assert "drift from the champion's data" in failed.stderr and "pixel_mean PSI" in failed.stderr

        edit_params(project, {"image": {"ingest": {"source": str(shapes)}}})
        done = dvc(project, "repro", "validate")
        assert "drift not checked: no champion of task kiln-classifier-" in done.stdout
    finally:
        git(project, "checkout", "params.yaml")
    assert served_bento(project) == bento_tag
    assert predictions(tmp_path / "serve_after.log") == before
    done = dvc(project, "repro")
    assert "package" not in ran_stages(done.stdout)  # the digits again: nothing new to package
