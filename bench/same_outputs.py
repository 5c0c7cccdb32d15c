"""Does a change keep every output of ingest through evaluate byte-identical? For each modality,
the built-in data set through `dvc repro evaluate` with the tests' shrunk params
(tests/conftest.py), in a project copy (tests/project.py copy_repo) of a base commit and of this
checkout's working tree; then the sha256 of every file under data/, models/ and reports/ of the
two, but the timing files (dvc.yaml says which: reports/latency.json, reports/plots/latency.csv).

    python bench/same_outputs.py BASE [--modalities image text audio] [--out /tmp/kiln_same]

Prints, per modality, the files compared and those that differ; exits 1 if any differs. A model
card (model.json) that differs only in layout, the same card once today's reader upgrades the
base's (pipeline/core/card.py _upgrade), counts as the same and is listed apart. Takes
about 1 min (image), 4-5 min (text) and 2 min (audio) per side on 2 cores. Layout changes of
issue 23 were checked this way (docs/benchmarks.md has no figures of it: it measures nothing).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TIMING = {"reports/latency.json", "reports/plots/latency.csv"}
MAKE_PROJECT = """
import sys
from pathlib import Path
from tests.conftest import write_params
from tests.project import copy_repo
root = Path(sys.argv[1])
root.mkdir(parents=True)
copy_repo(root)
write_params(root, {"data": {"modality": sys.argv[2]}})
"""


def project(checkout: Path, folder: Path, modality: str) -> Path:
    """A shrunk project copy of `checkout` for `modality`, reproduced through evaluate."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "BENTOML_HOME": str(folder / ".bentoml"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    subprocess.run([sys.executable, "-c", MAKE_PROJECT, str(folder), modality], cwd=checkout,
                   env=env, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=folder, env=env,
                   check=True, capture_output=True)
    return folder


def hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for top in ("data", "models", "reports") for path in sorted((folder / top).rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() not in TIMING}


def same_card(base: Path, this: Path) -> bool:
    """The two model.json hold the same card: the base's, upgraded by today's reader, is this."""
    import json

    from pipeline.core.card import _upgrade

    return _upgrade(json.loads(base.read_text())) == json.loads(this.read_text())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base", help="the commit to compare this working tree with")
    parser.add_argument("--modalities", nargs="+", default=["image", "text", "audio"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/kiln_same"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    base = args.out / "base-checkout"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.base], cwd=REPO,
                   check=True)
    differ = False
    try:
        for modality in args.modalities:
            before = hashes(project(base, args.out / f"base-{modality}", modality))
            after = hashes(project(REPO, args.out / f"this-{modality}", modality))
            changed = sorted(n for n in before.keys() | after.keys()
                             if before.get(n) != after.get(n))
            layout = [n for n in changed if n.endswith("/model.json") and same_card(
                args.out / f"base-{modality}" / n, args.out / f"this-{modality}" / n)]
            changed = [n for n in changed if n not in layout]
            differ |= bool(changed)
            print(f"{modality}: {len(before)} files compared, {len(changed)} differ"
                  + "".join(f"\n  {name}" for name in changed[:20])
                  + "".join(f"\n  (same card, new layout) {name}" for name in layout))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
