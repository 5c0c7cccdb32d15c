"""Kiln's Prefect flow: one task per dvc.yaml stage, in dvc.yaml's order, then a run summary.

Each task runs `dvc repro --single-item <stage>` in the project, so DVC alone decides whether the
stage is up to date and writes dvc.lock: a Prefect run and a plain `dvc repro` leave the same lock.
Stages run one after another in a subprocess each, because DVC cannot run two stages at once in
one workspace (it holds a repo lock), and a subprocess lets the task stream the stage's output.

DVC ends every `dvc repro` that changed something with hints: `git add` the files it changed
(dvc.lock, .gitignore) and `dvc push`. One repro per stage would say them after every stage, and
they name only DVC's own files, so the flow holds them back and ends with a run summary instead
(flows/report.py run_summary): the selected variant, the champion, drift, where the reports
are, and every file git sees changed, to commit. Kiln leaves DVC's core.autostage off, as DVC does by default: it would `git add` to
the user's index on every run, experiments and failed attempts included, and `git diff` would
then no longer show what a run changed.

`python -m flows.kiln` runs the flow once on this checkout (`make run`). It checks params.yaml
before Prefect starts, and prints a failure once, as one `kiln: ...` message: Prefect's own
reports of it (task and flow failure with tracebacks, final states) stay in the run's API log
but are kept off the console.
"""
# No `from __future__ import annotations` here: a deployment loads the flow from this file and
# validates `project_dir` against its annotation, which must then be a type, not a string.
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows.report import drift_markdown, evaluation_markdown, run_summary
from pipeline.params import ParamsError, load_params

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACT_KEY = "kiln-evaluation"
# Lines of stderr kept for the error message when a stage dies without its own `error:` line.
STDERR_TAIL_LINES = 15
# s for the temporary Prefect server `make run` starts to answer. It starts in 3-4 s, ~10 s on a
# fresh database (shared/STACK.md); Prefect's default of 20 s was missed on a loaded 2-core
# machine. A PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS in the environment wins.
SERVER_START_TIMEOUT_S = 120
# How Prefect's engines begin the console records of a failure; main() prints it itself.
PREFECT_FAILURE_RECORDS = ("Task run failed with", "Encountered exception during execution",
                           "Finished in state Failed")


class StageFailed(RuntimeError):
    """A dvc.yaml stage exited non-zero; the message carries the stage's own error lines."""


class ProjectError(ValueError):
    """The project's dvc.yaml or reports do not have what the flow needs; the message names it."""


def dvc_stages(project_dir: Path) -> dict[str, dict]:
    """The stages of `project_dir/dvc.yaml`, in file order (dvc.yaml is the one list of stages)."""
    path = project_dir / "dvc.yaml"
    try:
        stages = yaml.safe_load(path.read_text())["stages"]
    except FileNotFoundError:
        raise ProjectError(f"{path}: file not found (is {project_dir} a Kiln project?)") from None
    except (KeyError, TypeError):
        raise ProjectError(f"{path}: no `stages` mapping") from None
    if not isinstance(stages, dict) or not stages:
        raise ProjectError(f"{path}: `stages` must be a non-empty mapping")
    return stages


def stage_env(project_dir: Path) -> dict[str, str]:
    """Environment for a stage subprocess: offline, unbuffered, project-local tool homes."""
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", BENTOML_DO_NOT_TRACK="True", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # Stage output reaches the run log line by line instead of in 8 KiB blocks.
               PYTHONUNBUFFERED="1")
    env.setdefault("BENTOML_HOME", str(project_dir / ".bentoml"))
    env.setdefault("PREFECT_HOME", str(project_dir / ".prefect"))
    # dvc.yaml's commands say `python -m pipeline.stages ...`: make that the interpreter running this
    # flow, whose environment has the pipeline's packages, even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class OwnError:
    """Fed a stage's stderr line by line: True for the lines of its own error message, the
    `kiln <stage>: error: ...` line and the indented lines that continue it."""

    def __init__(self, stage: str):
        self.prefix, self.inside = f"kiln {stage}: error:", False

    def __call__(self, line: str) -> bool:
        self.inside = line.startswith(self.prefix) or (self.inside and line[:1].isspace())
        return self.inside


class DvcHints:
    """Fed `dvc repro`'s stdout line by line: the lines to show, without DVC's closing hints
    (module doc), whose files it collects. Blank lines are held back one line, as DVC starts a
    hint with one."""
    GIT_START, GIT_END = "To track the changes with git, run:", "dvc config core.autostage true"
    PUSH = "Use `dvc push` to send your updates to remote storage."

    def __init__(self) -> None:
        self.git_add: set[str] = set()
        self.push = False
        self._inside = self._blank = False

    def __call__(self, line: str) -> list[str]:
        text = line.strip()
        if self._inside:
            if text.startswith("git add "):
                self.git_add.update(shlex.split(text)[2:])
            self._inside = text != self.GIT_END
            return []
        if text in (self.GIT_START, self.PUSH):
            self._inside, self._blank = text == self.GIT_START, False
            self.push |= text == self.PUSH
            return []
        shown = [""] * self._blank + [line] * bool(text)
        self._blank = not text
        return shown


def changed_files(project_dir: Path, hints: list[DvcHints]) -> list[str]:
    """The files a commit of this run would take: what git sees changed or new in the project
    (dvc.lock, the committed reports, the champion record; also the user's own edits, such as
    params.yaml) and the files DVC's hints name; none outside a git repo."""
    done = subprocess.run(["git", "status", "--porcelain=v1", "-z"], cwd=project_dir,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return []
    entries = iter(done.stdout.split("\0"))
    files = set().union(*(h.git_add for h in hints))
    for entry in entries:
        if entry:
            files.add(entry[3:])
            if entry[0] in "RC":  # a rename or copy: its source path follows
                next(entries, None)
    return sorted(files)


def _stage_error_lines(stage: str, stderr_lines: list[str]) -> list[str]:
    """The stage's own error message, else the end of stderr (a traceback)."""
    own = list(filter(OwnError(stage), stderr_lines))
    return own or stderr_lines[-STDERR_TAIL_LINES:]


@task(task_run_name="{stage}", cache_policy=NO_CACHE)  # DVC, not Prefect, decides what reruns
def run_stage(stage: str, project_dir: Path) -> DvcHints:
    """`dvc repro --single-item <stage>`, its output streamed to the run log but for DVC's
    closing hints, which it returns; the stage's own error message goes into the StageFailed it
    raises instead, so it is reported once."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("%s (in %s)", " ".join(["dvc", *command[3:]]), project_dir)
    process = subprocess.Popen(command, cwd=project_dir, env=stage_env(project_dir),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    # Both pipes are drained at once: a stage that fills one while we block on the other hangs.
    stderr_lines: list[str] = []
    own_error = OwnError(stage)

    def drain_stderr() -> None:
        for line in process.stderr:
            stderr_lines.append(line.rstrip("\n"))
            if not own_error(stderr_lines[-1]):
                logger.info("%s", stderr_lines[-1])

    stderr_reader = threading.Thread(target=drain_stderr, name=f"stderr-{stage}", daemon=True)
    stderr_reader.start()
    hints = DvcHints()
    for line in process.stdout:
        for shown in hints(line.rstrip("\n")):
            logger.info("%s", shown)
    returncode = process.wait()
    stderr_reader.join()

    if returncode != 0:
        raise StageFailed(f"stage {stage!r} failed (dvc repro exited {returncode}):\n"
                          + "\n".join(_stage_error_lines(stage, stderr_lines)))
    return hints


def _argument(stages: dict[str, dict], stage: str, flag: str) -> Path:
    """The path a dvc.yaml stage's command passes for `flag`: where that stage wrote it."""
    words = shlex.split(stages.get(stage, {}).get("cmd", ""))
    if flag not in words[:-1]:
        raise ProjectError(f"dvc.yaml: the command of stage {stage!r} passes no {flag} path")
    return Path(words[words.index(flag) + 1])


@task(task_run_name="summary", cache_policy=NO_CACHE)
def publish_summary(project_dir: Path, stages: dict[str, dict], hints: list[DvcHints]) -> tuple[str, list[str]]:
    """Publish the evaluation table, drift and the champion's Bento tag as a markdown artifact;
    return the tag and the run summary (flows/report.py run_summary)."""
    def read(stage: str, flag: str) -> dict:
        return json.loads((project_dir / _argument(stages, stage, flag)).read_text())

    evaluation, latency = read("evaluate", "--details"), read("evaluate", "--latency")
    package, validation = read("package", "--out"), read("validate", "--details")
    try:
        bento_tag = package["champion"]["bento_tag"]
    except (KeyError, TypeError):
        raise ProjectError(f"{_argument(stages, 'package', '--out')}: missing "
                           "'champion.bento_tag'") from None
    markdown = evaluation_markdown(evaluation, latency, bento_tag) + drift_markdown(validation)
    create_markdown_artifact(markdown=markdown,
                             key=ARTIFACT_KEY, description="Kiln variants and the champion's Bento")
    summary = run_summary(evaluation, package, validation,
                          str(_argument(stages, "validate", "--docs") / "index.html"),
                          changed_files(project_dir, hints), any(h.push for h in hints))
    return bento_tag, summary


@flow(name="kiln", description="Reproduce Kiln's dvc.yaml stages in order; publish the evaluation.")
def kiln_pipeline(project_dir: Path = REPO_ROOT) -> str:
    """Check params.yaml whole, then run every dvc.yaml stage of `project_dir` in order; log the
    run summary and return the champion's Bento tag. DVC skips a stage whose deps and params are
    unchanged, so without the check here a misspelt section no stage lists would pass unseen."""
    project_dir = project_dir.resolve()
    load_params(project_dir / "params.yaml")
    stages = dvc_stages(project_dir)
    hints = [run_stage(stage, project_dir) for stage in stages]
    bento_tag, summary = publish_summary(project_dir, stages, hints)
    for line in summary:
        get_run_logger().info("%s", line)
    return bento_tag


class _NotFailureRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
                    and str(record.msg).startswith(PREFECT_FAILURE_RECORDS))


def main(project_dir: Path = REPO_ROOT) -> int:
    """Check params.yaml, run the flow; a failure is printed once, without a traceback."""
    try:
        load_params(project_dir / "params.yaml")  # before Prefect starts: fails in a second
    except ParamsError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    quiet = _NotFailureRecords()
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    timeout = os.environ.get(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.name,
                             SERVER_START_TIMEOUT_S)
    try:
        for handler in consoles:
            handler.addFilter(quiet)
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: int(timeout)}):
            kiln_pipeline(project_dir=project_dir)
    except (StageFailed, ProjectError, ParamsError) as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
