"""The wheels a Bento's requirements.txt lists, in a folder, so tests/test_service.py can install
a Bento into a clean virtualenv with no network, as a container image would from the index.
`make install` fills it (.kiln/wheelhouse):

    python -m tests.wheelhouse DIR

The requirements are the package stage's: bentofile.yaml python.packages, bentoml and all they
require, each `==` the version installed here (pipeline.lifecycle.bento_build.pinned_packages). `pip download
--no-deps --only-binary=:all:` fetches exactly those wheels, from pip's cache after the install
that just put them into .venv. DIR/requirements.txt, written last, lists them.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / ".kiln" / "wheelhouse"


def bento_requirements(bentofile: Path) -> list[str]:
    """What the package stage writes into a Bento's requirements.txt for `bentofile`."""
    from pipeline.lifecycle.bento_build import read_bentofile

    config, _ = read_bentofile(bentofile, "image")  # the same packages for every modality
    return [*config["python"]["packages"], f"bentoml=={metadata.version('bentoml')}"]


def fill(folder: Path, bentofile: Path) -> None:
    """folder holds exactly the wheels bentofile's Bento pins, and requirements.txt."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    requirements = "\n".join(bento_requirements(bentofile)) + "\n"
    wanted = folder / "requirements.in"
    wanted.write_text(requirements)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "-d", str(folder), "-r", str(wanted)], check=True)
    wanted.rename(folder / "requirements.txt")


if __name__ == "__main__":
    fill(Path(sys.argv[1]), REPO / "bentofile.yaml")
