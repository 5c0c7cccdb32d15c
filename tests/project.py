"""A temporary git copy of the Kiln repo and the commands tests run in it, as a user would:
`dvc`, `git`, and which stages a `dvc repro` ran."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def project_env(project: Path) -> dict[str, str]:
    """This interpreter as dvc.yaml's `python`; the project's own BentoML and Prefect homes."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "BENTOML_HOME": str(project / ".bentoml"),
            "PREFECT_HOME": str(project / ".prefect")}


def run(project: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=project, env=project_env(project), capture_output=True,
                          text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(project, sys.executable, "-m", "dvc", *args, check=check)


def git(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run(project, "git", "-c", "user.name=kiln", "-c", "user.email=kiln@localhost", *args)


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def copy_repo(root: Path) -> Path:
    """The repo's files as a clone would have them, without the outputs of a run (dvc.lock,
    reports, the champion record), committed in a new git repo (DVCLive 3.49 fails in one with
    no commit): a project before its first run."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outputs = [n for n in files if n == "dvc.lock" or n.startswith("reports/")]
    for name in set(files) - set(outputs):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "copy")
    return root


def stage_argv(stage: str) -> list[str]:
    """`<stage> --flag value ...` as dvc.yaml's cmd runs it (`python -m pipeline.stages ...`), for the
    tests and benchmarks that run a stage without DVC: the same arguments, written once."""
    python, flag, package, *argv = shlex.split(
        yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    assert (python, flag, package, argv[0]) == ("python", "-m", "pipeline.stages", stage)
    return argv
