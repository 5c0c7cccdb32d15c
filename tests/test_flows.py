"""The Prefect flow and its schedule, on a tiny DVC project built in tmp_path.

The fake project has the stage names and report files the flow relies on, at the paths its
stage commands pass (evaluate's --details and --latency, validate's --details, package's --out
with the champion's Bento tag), so these tests do not depend on the real stages.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.kiln import DvcHints
from flows.report import drift_markdown, evaluation_markdown

REPO = Path(__file__).resolve().parents[1]

# A stage script for the fake project: each stage appends its name to runs.log (untracked by DVC)
# so a test sees which stages really ran, and in which order; it writes its reports to the paths
# its command line passes (`--flag path` pairs), as the real stages do.
FAKE_STAGES = textwrap.dedent('''\
    import json, sys
    from pathlib import Path
    import yaml

    stage = sys.argv[1]
    paths = {flag: Path(path) for flag, path in zip(sys.argv[2::2], sys.argv[3::2])}

    def write(flag, data):
        paths[flag].parent.mkdir(parents=True, exist_ok=True)
        paths[flag].write_text(json.dumps(data))

    with open("runs.log", "a") as log:
        log.write(stage + "\\n")
    print(f"fake {stage}: running")
    if stage == "ingest":
        Path("data.txt").write_text("three images\\n")
    elif stage == "validate":
        write("--metrics", {"success": VALIDATION["success"]})
        write("--details", VALIDATION)
    elif stage == "evaluate":
        if (yaml.safe_load(Path("params.yaml").read_text())["gate"]["min_accuracy"] or 0) > 0.99:
            print("a warning before the error", file=sys.stderr)
            print("kiln evaluate: error: no variant passed the gate (min_accuracy 0.97)", file=sys.stderr)
            sys.exit(1)
        write("--metrics", {"selected": EVALUATION["selected"], "variants": {
            name: {k: m[k] for k in ("accuracy", "macro_f1", "size_bytes")}
            for name, m in EVALUATION["variants"].items()}})
        write("--latency", LATENCY)
        write("--details", EVALUATION)
    elif stage == "package":
        write("--out", {"champion": {"bento_tag": "kiln_classifier:fake123",
                                      "model_tag": "kiln-classifier:fake456", "accuracy": 0.9778},
                         "challenger_serves": True})
    ''')

FAKE_DVC_YAML = textwrap.dedent('''\
    stages:
      ingest:
        cmd: python stages.py ingest
        deps: [stages.py]
        outs: [data.txt]
      validate:
        cmd: >-
          python stages.py validate --metrics reports/validation.json
          --details reports/validation_details.json --docs reports/data_docs
        deps: [stages.py, data.txt]
        metrics:
          - reports/validation.json:
              cache: false
        outs:
          - reports/validation_details.json:
              cache: false
      evaluate:
        cmd: >-
          python stages.py evaluate --metrics reports/evaluation.json --latency reports/latency.json
          --details reports/evaluation_details.json
        deps: [stages.py, data.txt]
        params: [gate.min_accuracy]
        metrics:
          - reports/evaluation.json:
              cache: false
          - reports/latency.json:
              cache: false
        outs:
          - reports/evaluation_details.json:
              cache: false
      package:
        cmd: python stages.py package --out reports/package.json
        deps: [stages.py, reports/evaluation.json]
        outs:
          - reports/package.json:
              cache: false
    ''')

EVALUATION = {  # evaluate's --details file: every variant's measures and eligibility
    "variants": {
        "float_torch": {"accuracy": 0.9806, "macro_f1": 0.9801, "size_bytes": 245_000, "eligible": False},
        "float_onnx": {"accuracy": 0.9806, "macro_f1": 0.9801, "size_bytes": 246_100, "eligible": True},
        "int8_onnx": {"accuracy": 0.9778, "macro_f1": 0.9770, "size_bytes": 77_000, "eligible": True},
        "pruned_onnx": {"accuracy": 0.9500, "macro_f1": 0.9490, "size_bytes": 240_000, "eligible": False},
    },
    "selected": "int8_onnx",
}
LATENCY = {  # evaluate's --latency file: per batch size, ms per call by variant
    "latency_ms_b1": {"float_torch": 0.134, "float_onnx": 0.017, "int8_onnx": 0.021,
                      "pruned_onnx": 0.017},
    "latency_ms_b256": {"float_torch": 3.9, "float_onnx": 1.4, "int8_onnx": 1.6,
                        "pruned_onnx": 1.4},
}

VALIDATION = {"success": True, "drift": {"status": "warn", "champion": "kiln-classifier:old1",
                                         "features": {"label": {"psi": 0.12, "ks": None},
                                                      "pixel_mean": {"psi": 0.02, "ks": 0.04}}}}


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                          capture_output=True, text=True, check=True)


@pytest.fixture
def fake_project(tmp_path, params_writer):
    """(fail_evaluate=False, git=False) -> a fake project in tmp_path/project, a git repo if
    `git`. Its params.yaml is the real one (the flow checks it whole before any stage); a gate
    no model passes fails evaluate."""
    def make(fail_evaluate: bool = False, git: bool = False) -> Path:
        project = tmp_path / "project"
        project.mkdir()
        if git:
            subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        _dvc(project, "init", "-q", *[] if git else ["--no-scm"])
        _dvc(project, "config", "core.analytics", "false")
        (project / "stages.py").write_text(f"EVALUATION = {EVALUATION!r}\nLATENCY = {LATENCY!r}\n"
                                           f"VALIDATION = {VALIDATION!r}\n" + FAKE_STAGES)
        (project / "dvc.yaml").write_text(FAKE_DVC_YAML)
        params_writer(project, {"gate": {"min_accuracy": 1.0}} if fail_evaluate else None)
        return project
    return make


def runs(project: Path) -> list[str]:
    log = project / "runs.log"
    return log.read_text().split() if log.exists() else []


def test_evaluation_markdown_shows_every_variant_the_selection_and_the_bento_tag():
    markdown = evaluation_markdown(EVALUATION, LATENCY, "kiln_classifier:fake123")

    assert "Selected variant: **int8_onnx**" in markdown
    assert "`kiln_classifier:fake123`" in markdown
    header, rule, *rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert header.split("|")[1:-1] == [
        " variant ", " accuracy ", " macro-F1 ", " size (kB) ", " latency b1 (ms) ",
        " latency b256 (ms) ", " eligible ", " selected "]
    assert len(rows) == len(EVALUATION["variants"])
    by_name = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[1:-1]] for row in rows}
    assert by_name["int8_onnx"] == ["int8_onnx", "0.9778", "0.9770", "77.0", "0.021", "1.600", "yes", "**yes**"]
    assert by_name["pruned_onnx"][-2:] == ["no", ""]
    assert [name for name, cells in by_name.items() if cells[-1]] == ["int8_onnx"]


def test_evaluation_markdown_names_a_missing_metric():
    broken = {"variants": {"int8_onnx": {"accuracy": 0.98}}, "selected": "int8_onnx"}
    with pytest.raises(ValueError, match=r"variants\.int8_onnx: missing key 'macro_f1'"):
        evaluation_markdown(broken, {}, "kiln_classifier:fake123")


def test_a_stage_error_is_its_own_error_lines_else_the_end_of_its_stderr():
    from flows.kiln import STDERR_TAIL_LINES, _stage_error_lines

    reported = ["Running stage 'train':", "kiln train: error: params.yaml: image.train.lr: must be > 0",
                "ERROR: failed to reproduce 'train': failed to run: python -m pipeline.stages train, exited with 1"]
    assert _stage_error_lines("train", reported) == ["kiln train: error: params.yaml: image.train.lr: must be > 0"]
    crashed = [f"  frame {i}" for i in range(40)] + ["ZeroDivisionError: division by zero",
                                                     "ERROR: failed to reproduce 'train'"]
    assert _stage_error_lines("train", crashed) == crashed[-STDERR_TAIL_LINES:]
    assert "ZeroDivisionError: division by zero" in _stage_error_lines("train", crashed)


@pytest.mark.slow
def test_the_flow_runs_the_stages_in_order_publishes_and_a_rerun_changes_nothing(
        prefect_harness, fake_project):
    """In a git repo: the stages run in dvc.yaml's order, the evaluation is published as an
    artifact, and the run log ends with a summary whose commit line names every file git sees
    changed, without DVC's own hints (every stage's `dvc repro` ends with `git add dvc.lock ...`
    and `dvc push`, which name only DVC's files). Then a second run, and a plain `dvc repro`,
    change nothing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                ArtifactFilterKey, LogFilter, LogFilterFlowRunId)
    from prefect.logging.handlers import APILogHandler

    from flows.kiln import ARTIFACT_KEY, kiln_pipeline

    project = fake_project(git=True)
    subprocess.run(["git", "add", "stages.py", "dvc.yaml", "params.yaml", ".dvc"], cwd=project,
                   check=True)
    subprocess.run(["git", "-c", "user.name=k", "-c", "user.email=k@localhost", "commit", "-qm",
                    "project"], cwd=project, check=True)
    state = kiln_pipeline(project_dir=project, return_state=True)

    assert state.is_completed(), state.message
    assert state.result() == "kiln_classifier:fake123"
    assert runs(project) == ["ingest", "validate", "evaluate", "package"]
    assert json.loads(_dvc(project, "status", "--json").stdout) == {}
    flow_run = [state.state_details.flow_run_id]
    APILogHandler().flush()  # the run log reaches the API in batches
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(
                any_=flow_run)))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=flow_run)))
    assert artifact.type == "markdown"
    assert artifact.data == (evaluation_markdown(EVALUATION, LATENCY, "kiln_classifier:fake123")
                             + drift_markdown(VALIDATION))
    assert "Drift against champion `kiln-classifier:old1`: **warn**" in artifact.data
    assert "| label | 0.120 | n/a |" in artifact.data

    messages = [log.message for log in sorted(logs, key=lambda log: log.timestamp)]
    (commit,) = [m for m in messages if "git add" in m]
    # DVC adds data.txt (ingest's out) to .gitignore and writes dvc.lock; the stages write the
    # reports, and runs.log is the fake stages' own file
    assert commit.startswith("  To keep this run: git add .gitignore dvc.lock reports/ runs.log "
                             "&& git commit, then `dvc push`"), commit
    summary = messages[messages.index("Kiln run finished."):]
    assert commit in summary and messages.index("Kiln run finished.") > max(
        i for i, m in enumerate(messages) if m.startswith("fake package"))
    assert "  Selected variant: int8_onnx, test accuracy 0.9778." in summary
    assert ("  Champion: Bento kiln_classifier:fake123 (model kiln-classifier:fake456, test "
            "accuracy 0.9778); this run's model serves.") in summary
    assert "  Drift: warn against kiln-classifier:old1." in summary
    assert DvcHints.PUSH not in messages and "To enable auto staging, run:" not in messages

    lock = (project / "dvc.lock").read_bytes()
    kiln_pipeline(project_dir=project)
    assert (project / "dvc.lock").read_bytes() == lock
    # DVC itself agrees the flow left the workspace up to date: a plain repro runs nothing.
    _dvc(project, "repro")
    assert (project / "dvc.lock").read_bytes() == lock
    assert runs(project) == ["ingest", "validate", "evaluate", "package"]


def test_bad_params_stop_the_run_before_any_stage(fake_project, capfd):
    """`make run` (flows.kiln.main) with a misspelt copy of a section beside the real one: DVC
    alone would rerun nothing and pass; the flow names it in one line, before Prefect starts."""
    from flows.kiln import main

    project = fake_project()
    params = project / "params.yaml"
    params.write_text(params.read_text() + "trian:\n  epochs: 3\n")
    assert main(project) == 1
    out, err = capfd.readouterr()
    assert err == f"kiln: {params}: trian: unknown section (did you mean 'train'?)\n" and out == ""
    assert runs(project) == []


def test_a_misspelt_registry_name_stops_the_run_before_any_stage(fake_project, capfd):
    """A name checked against its registry (pipeline/core/registry.py), not the schema: the
    flow refuses it up front too, though compress is the only stage that uses it."""
    from flows.kiln import main

    project = fake_project()
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("prune_method: structured_l1",
                                                 "prune_method: structured_l2", 1))
    assert main(project) == 1
    out, err = capfd.readouterr()
    assert err.startswith(f"kiln: {params}: compress.prune_method: expected one of [")
    assert err.endswith(", got 'structured_l2' (did you mean 'structured_l1'?)\n") and out == ""
    assert runs(project) == []


@pytest.mark.slow
def test_a_failing_stage_fails_the_flow_with_its_error_once_and_stops_the_pipeline(
        prefect_harness, fake_project, capfd, monkeypatch):
    """Through `make run`'s entry: the stage's error is printed once, without a traceback; the
    Prefect flow run is Failed with that error as its message."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.kiln import main

    # Prefect's console handler keeps the stream it was set up with (an earlier test's capture).
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            monkeypatch.setattr(handler.console, "file", sys.stderr)
    project = fake_project(fail_evaluate=True)
    assert main(project) == 1
    out, err = capfd.readouterr()
    console = out + err
    assert console.count("no variant passed the gate") == 1 and "Traceback" not in console
    assert err.endswith("kiln: stage 'evaluate' failed (dvc repro exited 255):\n"
                        "kiln evaluate: error: no variant passed the gate (min_accuracy 0.97)\n")
    assert "a warning before the error" in console  # the rest of the stage's output is streamed
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert run.state.is_failed()
    assert "kiln evaluate: error: no variant passed the gate (min_accuracy 0.97)" in run.state.message
    assert "a warning before the error" not in run.state.message  # only the stage's own error
    assert runs(project) == ["ingest", "validate", "evaluate"]
    assert not (project / "reports" / "package.json").exists()


@pytest.mark.slow
def test_the_scheduled_deployment_registers_its_cron_and_runs_the_flow(prefect_harness, tmp_path, fake_project):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.kiln import REPO_ROOT, kiln_pipeline
    from flows.schedule import kiln_runner
    from pipeline.params import load_params

    schedule = load_params(REPO_ROOT / "params.yaml").schedule
    project = fake_project()
    runner = kiln_runner(schedule, project_dir=project)
    deployment_name = f"{kiln_pipeline.name}/{schedule.deployment}"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
    assert [s.schedule.cron for s in deployment.schedules] == [schedule.cron]
    assert [s.schedule.timezone for s in deployment.schedules] == ["UTC"]

    flow_run = run_deployment(deployment_name, timeout=0)
    asyncio.run(runner.start(run_once=True))

    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
    assert finished.state.is_completed(), finished.state.message
    assert runs(project) == ["ingest", "validate", "evaluate", "package"]


@pytest.mark.slow
def test_make_schedules_server_serves_a_ui_showing_flow_runs_offline(tmp_path):
    """The Prefect server as `make schedule` starts it (flows.server, in a session of its own)
    on a free port, not Prefect's 4200: a flow run created through its API shows by name in the
    UI's runs page, rendered by headless Chromium with no network, which requested nothing
    outside; `/` serves that UI (not a redirect to the new one, which calls Amplitude); the
    SIGTERM make's trap sends stops it."""
    import httpx
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed

    from flows.schedule import SERVER_WAIT_S, wait_for_api
    from flows.server import api_url
    from pipeline.lifecycle.local_server import free_port
    from tests.browser import need_chromium, offline_page

    need_chromium()
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "flows.server", "--port", str(port)],
                                  cwd=REPO, env={**os.environ, "PREFECT_HOME": str(tmp_path)},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_api(api_url(port), SERVER_WAIT_S)

        @flow(name="kiln-ui-check")
        def tiny() -> None:
            pass

        with temporary_settings({PREFECT_API_URL: api_url(port)}), \
                get_client(sync_client=True) as client:
            run = client.create_flow_run(tiny, name=f"kiln-ui-run-{port}", state=Completed())
        landing = httpx.get(f"http://127.0.0.1:{port}/", headers={"accept": "text/html"})
        assert landing.status_code == 200, landing.headers  # 307 to /v2 with the new UI
        # The runs list sits below the activity chart: a window tall enough to show it. On a
        # loaded machine Chromium has dumped the DOM before the app had rendered (twice in a
        # row once, in a fresh clone's `make test`): more looks.
        for attempt in range(4):
            page = offline_page(f"http://127.0.0.1:{port}/runs", tmp_path / f"browser{attempt}",
                                (1400, 1000))
            assert page.requests == []
            if run.name in page.dom:
                break
        assert run.name in page.dom, re.sub(r"<[^>]+>", " ", page.dom)[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/api/health")


def test_the_drift_summary_of_text_data_names_the_out_of_vocabulary_shares():
    """The text modality's drift metrics, as validate writes them to its details, carry the
    out-of-vocabulary shares as a note the run summary shows."""
    from pipeline.core.drift import DriftReport
    from pipeline.params import load_params
    from pipeline.modalities.text.checks import TextDrift

    report = DriftReport({"label": (0.0, None), "words": (0.004, 0.018)},
                         thresholds=load_params(REPO / "params.yaml").drift, classes_added=[],
                         classes_removed=[])
    drift = TextDrift(report, oov_rate=0.218, reference_oov_rate=0.157).metrics(warned=False,
                                                                               failed=False)
    text = {"drift": {**drift, "champion": "kiln-classifier:t1"}}
    assert "Out-of-vocabulary words: 21.8% of the new train split, 15.7% of the champion's own." \
        in drift_markdown(text)
    assert "Out-of-vocabulary" not in drift_markdown(VALIDATION)


def test_drift_not_checked_says_why_in_the_summary_and_the_artifact():
    """A clone with the champion record but not its Bento (no `dvc pull`): validate cannot
    check drift and says why; the run summary and the flow's artifact repeat that reason
    instead of a generic one."""
    from flows.report import run_summary

    why = ("champion kiln:abc named by reports/champion.json is neither in models/champion nor "
           "in the BentoML store (`dvc pull` brings it)")
    validation = {"success": True, "drift": {"status": "skipped", "reason": why}}
    package = {"champion": {"bento_tag": "kiln:abc", "model_tag": "kiln-classifier:def",
                            "accuracy": 0.98}, "challenger_serves": True}
    summary = run_summary(EVALUATION, package, validation, "reports/data_docs/index.html",
                          ["dvc.lock"], push=True)
    assert f"  Drift: not checked: {why}." in summary
    assert f"Drift: not checked: {why}." in drift_markdown(validation)
