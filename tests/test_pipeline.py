"""The whole pipeline on the built-in digits, in a temporary copy of the repo, with the real
params.yaml shrunk (fewer epochs and timing runs): `dvc repro`, its no-op rerun, what a param
change reruns, the Prefect flow over the same workspace, and the packaged Bento served over HTTP."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.bento_server import bento_server

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHRINK = {  # section -> key -> value; everything else is the real params.yaml
    "augment": {"copies": 1},
    "train": {"epochs": 6},
    "compress": {"finetune_epochs": 1, "calibration_images": 64},
    "evaluate": {"latency_runs": 5},
    "gate": {"min_accuracy": 0.9, "max_accuracy_drop": 0.02},
}


def edit_params(project: Path, changes: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def project_env(project: Path) -> dict[str, str]:
    # dvc.yaml says `python -m pipeline`: that must be this interpreter.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "BENTOML_HOME": str(project / ".bentoml"),
            "PREFECT_HOME": str(project / ".prefect")}


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def copy_repo(root: Path) -> Path:
    """The repo's files as a clone would have them (no dvc.lock), committed in a new git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name != "dvc.lock" and (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    # A clone has a commit; DVCLive 3.49 fails in a git repo with none ("Empty git repo").
    git = ["git", "-c", "user.name=kiln", "-c", "user.email=kiln@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the repo, reproduced once with `dvc repro` on the shrunk params."""
    root = copy_repo(tmp_path_factory.mktemp("kiln"))
    edit_params(root, SHRINK)
    done = dvc(root, "repro")
    assert ran_stages(done.stdout) == ["ingest", "validate", "augment", "train", "compress",
                                       "evaluate", "package"]
    return root


def test_repro_produces_every_artifact(project):
    evaluation = json.loads((project / "reports/evaluation.json").read_text())
    assert set(evaluation["variants"]) == {"float_torch", "float_onnx", "pruned_onnx", "int8_onnx"}
    selected = evaluation["selected"]
    assert evaluation["variants"][selected]["eligible"]
    assert evaluation["variants"][selected]["accuracy"] >= SHRINK["gate"]["min_accuracy"]
    card = json.loads((project / "models/selected/model.json").read_text())
    assert card["variant"] == selected and card["classes"] == [str(d) for d in range(10)]
    assert card["params"]["train"]["epochs"] == SHRINK["train"]["epochs"]
    assert json.loads((project / "reports/validation.json").read_text())["success"] is True
    assert (project / "reports/data_docs/index.html").exists()
    assert len((project / "reports/train/plots/metrics/val_acc.tsv").read_text().splitlines()) == 7
    assert json.loads((project / "reports/package.json").read_text())["bento_tag"].startswith("kiln:")


def test_second_repro_is_a_noop(project):
    lock = (project / "dvc.lock").read_text()
    done = dvc(project, "repro")
    assert ran_stages(done.stdout) == []
    assert "Data and pipelines are up to date" in done.stdout
    assert (project / "dvc.lock").read_text() == lock


def test_served_accuracy_equals_evaluated(project, tmp_path):
    """Every test image, uploaded as its PNG file, through the Bento the pipeline built."""
    evaluation = json.loads((project / "reports/evaluation.json").read_text())
    bento_tag = json.loads((project / "reports/package.json").read_text())["bento_tag"]

    with open(project / "data/ingested/manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    with bento_server(bento_tag, project / ".bentoml", tmp_path / "serve.log") as (client, _):
        correct = 0
        for row in rows:
            with open(project / "data/ingested" / row["path"], "rb") as image:
                response = client.post("/classify", files={"image": ("digit.png", image, "image/png")})
            assert response.status_code == 200, response.text
            correct += response.json()["label"] == row["label"]
    served = correct / len(rows)
    assert served == pytest.approx(evaluation["variants"][evaluation["selected"]]["accuracy"], abs=1e-5)


def test_changing_epochs_reruns_train_and_after_only(project):
    edit_params(project, {"train": {"epochs": SHRINK["train"]["epochs"] + 1}})
    try:
        done = dvc(project, "repro")
        assert ran_stages(done.stdout) == ["train", "compress", "evaluate", "package"]
    finally:
        edit_params(project, {"train": {"epochs": SHRINK["train"]["epochs"]}})
        dvc(project, "repro")


def test_prefect_flow_reruns_what_dvc_says_and_publishes(project, prefect_harness):
    """The flow over the same workspace: a changed param reruns its stage and those after it,
    and the flow leaves the pipeline as up to date as `dvc repro` would."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.kiln import kiln_pipeline

    edit_params(project, {"evaluate": {"latency_runs": SHRINK["evaluate"]["latency_runs"] + 1}})
    before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    state = kiln_pipeline(project_dir=project, return_state=True)
    assert state.is_completed(), state.message
    bento_tag = state.result()
    assert bento_tag == json.loads((project / "reports/package.json").read_text())["bento_tag"]
    after = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert [s for s in before if before[s] != after[s]] == ["evaluate", "package"]
    assert ran_stages(dvc(project, "repro").stdout) == []
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["kiln-evaluation"])))
    assert any(bento_tag in a.data and "int8_onnx" in a.data for a in artifacts)


def test_gate_failure_stops_before_package(project):
    package_json = (project / "reports/package.json").read_text()
    edit_params(project, {"gate": {"min_accuracy": 1.0, "max_accuracy_drop": 0.0}})
    try:
        done = dvc(project, "repro", check=False)
        assert done.returncode != 0
        assert "kiln evaluate: error: gate: no variant is eligible" in done.stderr + done.stdout
        assert "package" not in ran_stages(done.stdout)
        assert (project / "reports/package.json").read_text() == package_json
    finally:
        edit_params(project, SHRINK)
