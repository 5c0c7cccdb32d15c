"""Shared test settings: nothing phones home from any test, whatever the caller's environment
says; and the one way tests get params: the real params.yaml, shrunk."""
import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.update(DVC_NO_ANALYTICS="1", BENTOML_DO_NOT_TRACK="True", DO_NOT_TRACK="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")
# pytest-xdist workers share the cores: each worker's processes (its own torch, the stages it
# starts) get their share of OpenMP threads, before torch is imported. With torch's default of a
# thread per core, two `dvc repro` side by side on 2 cores took 76 s each instead of 53
# (docs/benchmarks.md, Tests): the threads spin waiting for each other.
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

REPO = Path(__file__).resolve().parents[1]
# What every test that runs stages changes in the real params.yaml (nested as params.yaml is), to
# stay fast (fewer epochs, copies and timing runs; the gate's drop allowed after a short training).
# 8 epochs: LeNet-5 on the digits tests 0.969 (6 epochs: 0.958), clear of the gate's bar, the
# logistic-regression baseline's 0.953.
SHRINK = {
    "validate": {"min_items": 10},
    "image": {"augment": {"copies": 1}, "train": {"max_epochs": 8}},
    "compress": {"finetune_epochs": 1, "calibration_items": 64},
    "evaluate": {"latency_runs": 5, "latency_batch_sizes": [1, 32]},
    "gate": {"max_accuracy_drop": 0.02},
    "serve": {"workers": 1},  # each server the stages start and the tests query: one worker's start
    "package": {"infra_items": 100},  # of the digits. 359 test images (smaller test splits: all)
}


def merged(params: dict, changes: dict) -> dict:
    """`params` with `changes` (nested as params.yaml) merged in: a mapping into a mapping key
    by key, anything else replacing the value."""
    out = dict(params)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def shrunk(changes: dict | None = None) -> dict:
    """The real params.yaml with SHRINK, then `changes` (nested as params.yaml), merged in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return merged(merged(params, SHRINK), changes or {})


def write_params(folder: Path, changes: dict | None = None) -> Path:
    """Write shrunk(changes) to folder/params.yaml; return its path."""
    path = Path(folder) / "params.yaml"
    path.write_text(yaml.safe_dump(shrunk(changes), sort_keys=False, allow_unicode=True))
    return path


# The longest test files (summed durations of a `make test`, docs/benchmarks.md Tests), started
# first: pytest-xdist's loadfile hands out whole files in collection order, and a long file
# started last kept one worker busy while the other stood idle.
LONGEST_FIRST = ("test_pipeline.py", "test_modalities.py", "test_recipes.py", "test_promotion.py",
                 "test_service.py", "test_flows.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within


@pytest.fixture(scope="session")
def params_writer():
    """write_params, for tests and fixtures of any scope: (folder, changes) -> params.yaml path."""
    return write_params


@pytest.fixture
def running():
    """(workers, batch) -> the executor (pipeline/core/executor.py) maps with them, as a stage
    started with params.yaml engine does; back to mapping in the test's process afterwards."""
    import dataclasses

    from pipeline.core import executor
    from pipeline.params import load_params

    engine = load_params(REPO / "params.yaml").engine
    yield lambda workers, batch: executor.start(dataclasses.replace(engine, workers=workers,
                                                                    batch=batch))
    executor.start(dataclasses.replace(engine, workers=1, batch=1))


def modality_project(folder: Path, modality: str):
    """(source, own=None, **shared) -> `folder` with a params.yaml (the repo's, shrunk) that
    reads `modality` from `source`: data.modality and <modality>.ingest.source set, then `own`
    merged into the modality's section and `shared` (section -> its changes) into the rest."""
    def make(source: Path | str, own: dict | None = None, **shared) -> Path:
        folder.mkdir(exist_ok=True)
        own = merged({"ingest": {"source": str(source)}}, own or {})
        write_params(folder, {"data": {"modality": modality}, modality: own, **shared})
        return folder
    return make


@pytest.fixture
def project(tmp_path):
    """(source, image=None, **shared) -> a project folder reading images from `source`
    (modality_project)."""
    return modality_project(tmp_path / "project", "image")


@pytest.fixture
def text_project(tmp_path):
    """(source, text=None, **shared) -> a project folder reading texts from `source`."""
    return modality_project(tmp_path / "project", "text")


@pytest.fixture
def audio_project(tmp_path):
    """(source, audio=None, **shared) -> a project folder reading clips from `source`."""
    return modality_project(tmp_path / "project", "audio")


@pytest.fixture
def stage(monkeypatch, capsys):
    """Run `python -m pipeline.stages <args>` in-process in a project folder: (exit code, stdout+stderr).
    There is no champion (first run), so the BentoML store is not consulted."""
    import pipeline.stages.__main__
    import pipeline.stages.validate
    from pipeline.lifecycle.champion import Reference

    monkeypatch.setattr(pipeline.stages.validate, "reference",
                        lambda *_: Reference(None, None, "no champion in this test"))

    def run(work: Path, *args: str) -> tuple[int, str]:
        monkeypatch.chdir(work)
        monkeypatch.setattr(sys, "argv", ["python -m pipeline.stages", *args])
        code = pipeline.stages.__main__.main()
        out = capsys.readouterr()
        return code, out.out + out.err
    return run


@pytest.fixture(scope="module")
def closed_network():
    """Skip (fail under env CI) where a loopback-only namespace under strace cannot be had
    (tests/closed_network.py)."""
    from tests.closed_network import closed_network_missing

    reason = closed_network_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"no network namespace under strace: {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A throwaway Prefect API and database; Prefect's home (memo store, storage) in a tmp dir."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # 120 s for the temporary server to answer (Prefect's default, 30, was missed with two test
    # workers on 2 busy cores, as flows/kiln.py's SERVER_START_TIMEOUT_S was by `make run`)
    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect_home")}), \
            prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def packaged(tmp_path_factory):
    """The package stage run as dvc.yaml runs it on a tiny model (tests/tiny_bento.py), into a
    throwaway BentoML home; one per session: tests/test_service.py and tests/test_grpc.py share it."""
    from tests.tiny_bento import exported, run_package, write_ingested, write_tiny_model

    root = tmp_path_factory.mktemp("package")
    model_dir = root / "selected"
    write_tiny_model(model_dir)
    write_ingested(root / "ingested", 12, seed=5)
    done, report = run_package(model_dir, root / "ingested", root / "bentoml")
    assert done.returncode == 0, done.stderr
    return {"model_dir": model_dir, "home": root / "bentoml", "report": report,
            "stdout": done.stdout, "export": exported(root, report["champion"]["bento_tag"])}


@pytest.fixture(scope="session")
def server(packaged, tmp_path_factory):
    """The packaged Bento under `bentoml serve` with no --host (tests/bento_server.py): HTTP and
    gRPC (client.grpc_port) on free loopback ports."""
    from tests.bento_server import bento_server

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    bento_tag = packaged["report"]["champion"]["bento_tag"]
    with bento_server(bento_tag, packaged["home"], log) as (client, port):
        yield {"client": client, "log": log, "port": port, **packaged}
