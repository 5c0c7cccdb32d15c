"""The layout's test: a fourth modality is one folder. tests/modality_points/ (a toy: classes of
points in a few dimensions) copied to pipeline/modalities/points/ of a fresh project, with its
params section, and nothing else: no registration, no stage, dvc.yaml or bentofile.yaml line.
`dvc repro` runs the seven stages on points (DVC's deps follow the folder:
pipeline/modalities/${data.modality}), and the Bento serves them: infra validation through gRPC,
another modality's endpoint answering 400 with where points go."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from pipeline.serving import oip
from pipeline.stages.__main__ import STAGES
from tests.bento_server import bento_server
from tests.conftest import write_params
from tests.project import copy_repo, dvc, ran_stages, run

TOY = Path(__file__).resolve().parent / "modality_points"


@pytest.fixture(scope="module")
def points_project(tmp_path_factory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("points"))
    shutil.copytree(TOY, root / "pipeline/modalities/points",
                    ignore=shutil.ignore_patterns("__pycache__", "params.yaml"))
    section = yaml.safe_load((TOY / "params.yaml").read_text())
    write_params(root, {"data": {"modality": "points"}, **section})
    return root


@pytest.mark.slow
def test_a_fourth_modality_is_one_folder_run_by_the_seven_stages_and_served(points_project,
                                                                            tmp_path):
    root = points_project
    done = dvc(root, "repro")
    assert ran_stages(done.stdout) == list(STAGES)
    assert "ingest: 180 points from blobs" in done.stdout
    evaluation = json.loads((root / "reports/evaluation.json").read_text())
    assert evaluation["accuracy"][evaluation["selected"]] >= 0.9  # three separated blobs
    card = json.loads((root / "models/selected/model.json").read_text())
    assert card["recipe"]["data"]["modality"] == "points"
    assert card["recipe"]["section"]["train"] == yaml.safe_load(
        (TOY / "params.yaml").read_text())["points"]["train"]
    assert "infra validation (36 test points through gRPC ModelInfer)" in done.stdout
    assert json.loads(dvc(root, "status", "--json").stdout) == {}

    bento = run(root, sys.executable, "-m", "pipeline.lifecycle.champion", "bento",
                "--champion", "reports/champion.json", "--export", "models/champion").stdout.strip()
    from open_inference.grpc import protocol as pb
    from open_inference.grpc.service import GRPCInferenceServiceStub

    test = sorted((root / "data/ingested/points/test/east").glob("*.txt"))[:2]
    points = np.array([np.array(p.read_text().split(), np.float32) for p in test])
    with bento_server(bento, root / ".bentoml", tmp_path / "serve.log") as (client, _):
        refused = client.post("/classify_text", json={"text": "hello"})
        assert refused.status_code == 400 and "send points to gRPC ModelInfer" in refused.text
        with grpc.insecure_channel(f"127.0.0.1:{client.grpc_port}") as channel:
            name, version = card_tag(root).split(":")
            answer = GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
                model_name=name, model_version=version,
                inputs=[{"name": "points", "datatype": "FP32", "shape": list(points.shape)}],
                raw_input_contents=[points.astype("<f4").tobytes()]), timeout=30)
    assert (oip.probabilities_of(answer).argmax(1) == 0).all()  # "east", the first class


def card_tag(root: Path) -> str:
    """The champion's model tag, as the package report names it."""
    return json.loads((root / "reports/package.json").read_text())["champion"]["model_tag"]
