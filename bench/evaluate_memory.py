"""Peak memory and wall time of the evaluate stage as its test split grows, for this checkout and
a base commit: does evaluate hold the test split, or one batch of it?

    python bench/evaluate_memory.py BASE [--tests 2000 30000] [--runs 3] [--out /tmp/kiln_eval_mem]

Method: the workspace's trained digits models (models/float, models/compressed: run `dvc repro`
first) and an ingested folder whose train and val splits are the workspace's
(data/ingested) and whose test split is N generated digits: the built-in test digits, each
shifted by up to 1 px and with Gaussian noise (sd 8), encoded as distinct PNGs with their labels.
The folder is written as each side's code reads it: Parquet shards and manifest.json
(pipeline/core/dataset.py write_items, with params.yaml's ingest.shard_items and
ingest.row_group_bytes, as the ingest stage writes them), or, for a BASE from before the shards
(its pipeline/core/dataset.py has no ShardWriter), the same items as one file each with
manifest.csv and classes.json. Each side runs `python -m pipeline.stages evaluate` with
dvc.yaml's arguments and the workspace's params.yaml (for BASE, less the keys its own
params.yaml lacks: its code refuses unknown keys) in a folder of its own (its code: this
checkout, or BASE checked out with `git worktree`), under `/usr/bin/time -f "%M %e"` (peak RSS of
the stage process, wall seconds); runs alternate between the sides and the median of `--runs` is
printed per N. Evaluate's latency timing is included (params.yaml evaluate: latency_runs x batch
sizes).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.dataset import SPLITS, item_batches, read_manifest, write_items  # noqa: E402
from pipeline.params import load_params  # noqa: E402

ARGS = ["evaluate", "--model", "models/float", "--compressed", "models/compressed",
        "--data", "data/ingested", "--metrics", "r/evaluation.json", "--latency",
        "r/latency.json", "--details", "r/details.json", "--confusion", "r/confusion.csv",
        "--tradeoff", "r/tradeoff.csv", "--latency-plot", "r/latency.csv", "--out", "selected"]


def items(tests: int):
    """data/ingested's train and val items (row, bytes), then `tests` generated test digits."""
    originals = []
    for rows, data in item_batches(REPO / "data/ingested", SPLITS, 1024):
        for r, d in zip(rows, data):
            if r["split"] == "test":
                originals.append((r, d))
            else:
                yield r, d
    rng = np.random.default_rng(0)
    for i in range(tests):
        r, d = originals[i % len(originals)]
        pixels = np.asarray(Image.open(io.BytesIO(d)), np.float32)
        dy, dx = rng.integers(-1, 2, 2)
        pixels = np.roll(pixels, (dy, dx), (0, 1)) + rng.normal(0, 8, pixels.shape)
        png = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(png, format="PNG")
        item_id = f"images/test/{r['label']}/gen{i:06d}.png"
        yield {"id": item_id, "label": r["label"], "split": "test", "source": item_id}, png.getvalue()


def sharded(code: Path) -> bool:
    """Whether `code` reads an ingested folder as shards (else as files + manifest.csv)."""
    return "class ShardWriter" in (code / "pipeline/core/dataset.py").read_text()


def ingested(out: Path, tests: int, shards: bool) -> Path:
    """data/ingested's train and val items and `tests` generated test digits as an ingested
    folder: shards, or (not shards) one file per item with manifest.csv and classes.json."""
    classes = read_manifest(REPO / "data/ingested")[1]
    if shards:
        ingest = load_params(REPO / "params.yaml").ingest
        write_items(out, items(tests), classes, ingest.shard_items, ingest.row_group_bytes)
        return out
    rows = []
    for row, data in items(tests):
        (out / row["id"]).parent.mkdir(parents=True, exist_ok=True)
        (out / row["id"]).write_bytes(data)
        rows.append({"path": row["id"], "label": row["label"], "split": row["split"],
                     "source": row["source"]})
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "source"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "classes.json").write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    return out


def known(params: dict, allowed: dict) -> dict:
    """`params` less the keys `allowed` (a params.yaml) lacks, section by section."""
    return {k: known(v, allowed[k]) if isinstance(v, dict) and isinstance(allowed[k], dict)
            else v for k, v in params.items() if k in allowed}


def side(folder: Path, code: Path, data: Path) -> Path:
    """A folder to run evaluate in: the workspace's params.yaml and models, `data` as
    data/ingested; `code` on PYTHONPATH (the params.yaml keys its own params.yaml lacks dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    own = yaml.safe_load((code / "params.yaml").read_text())
    (folder / "params.yaml").write_text(yaml.safe_dump(known(params, own), sort_keys=False))
    for name in ("models/float", "models/compressed"):
        if not (folder / name).exists():
            shutil.copytree(REPO / name, folder / name)
    (folder / "data").mkdir(exist_ok=True)
    link = folder / "data/ingested"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(data)
    return folder


def run(folder: Path, code: Path) -> tuple[int, float]:
    """(peak RSS in kB, wall s) of one evaluate run."""
    shutil.rmtree(folder / "selected", ignore_errors=True)
    (folder / "r").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(["/usr/bin/time", "-f", "%M %e", sys.executable, "-m",
                           "pipeline.stages", *ARGS], cwd=folder, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    rss, wall = done.stderr.strip().splitlines()[-1].split()
    return int(rss), float(wall)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("--tests", type=int, nargs="+", default=[2000, 30000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kiln_eval_mem"))
    args = parser.parse_args()
    base = args.out / "base_code"
    if not base.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO,
                       check=True, capture_output=True)
    print("| test items | this checkout: peak RSS (MB), wall (s) | base: peak RSS (MB), wall (s) |")
    print("| ---: | --- | --- |")
    for n in args.tests:
        data = {}
        for code in (REPO, base):
            shards = sharded(code)
            folder = args.out / (f"data_{n}" if shards else f"data_{n}_files")
            if not (folder / ("manifest.json" if shards else "manifest.csv")).exists():
                ingested(folder, n, shards)
            data[code] = folder
        sides = {"this": (side(args.out / f"this_{n}", REPO, data[REPO]), REPO),
                 "base": (side(args.out / f"base_{n}", base, data[base]), base)}
        measured = {name: [] for name in sides}
        for _ in range(args.runs):
            for name, (folder, code) in sides.items():
                measured[name].append(run(folder, code))
        accuracy = {name: json.loads((folder / "r/evaluation.json").read_text())["accuracy"]
                    for name, (folder, _) in sides.items()}
        assert accuracy["this"] == accuracy["base"], accuracy  # the same metrics either way

        def cell(name: str) -> str:
            rss = statistics.median(m[0] for m in measured[name]) / 1000
            wall = statistics.median(m[1] for m in measured[name])
            return f"{rss:,.0f} MB, {wall:.1f} s"
        print(f"| {n:,} | {cell('this')} | {cell('base')} |", flush=True)


if __name__ == "__main__":
    main()
