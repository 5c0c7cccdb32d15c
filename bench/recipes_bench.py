"""Recipes against the data: the same data through ingest .. evaluate with several params.yaml
changes, to compare a fixed number of epochs with early stopping, and the variants with the
baselines the gate measures them against.

    .venv/bin/python bench/recipes_bench.py languages   # tests/languages.py: 6 x 120 texts
    .venv/bin/python bench/recipes_bench.py digits      # the built-in digits
    .venv/bin/python bench/recipes_bench.py texts       # the built-in 10 languages (6,000 texts)
    .venv/bin/python bench/recipes_bench.py audio       # the built-in spoken digits (1,200 clips)
    ... --config NAME                                   # only that configuration (repeatable)

Each configuration runs the stages as dvc.yaml runs them (`python -m pipeline.stages <stage>`, a fresh
process each) in a temporary project holding the real params.yaml with its changes
(CONFIGS below; evaluate.latency_runs 5, as latency is not compared here; "all N epochs" sets
train.patience to the budget: every epoch runs and the best is kept, where the recipe before
early stopping kept the last). Reported per
configuration: the train stage's last line (epochs run of the budget, why it stopped, the epoch
saved), its wall time (one run, the process's start-up included), the test accuracy of every
variant and baseline and the variant the gate selected. On a shared machine wall times move a
lot with the other load (`os.getloadavg` is printed); accuracies do not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import merged  # noqa: E402
from tests.languages import write_language_folder  # noqa: E402
from tests.project import stage_argv  # noqa: E402

STAGES = ('ingest', 'augment', 'train', 'compress', 'evaluate')  # run as dvc.yaml runs them (tests/project.py stage_argv)
# data set -> configuration -> params changes (section -> key -> value)
CONFIGS = {
    "languages": {
        "text_encoder, all 4 epochs": {"text": {"train": {"max_epochs": 4}}, "train": {"patience": 4}},
        "text_encoder, early stopping": {},
        "text_encoder, early stopping, budget 20": {"text": {"train": {"max_epochs": 20}}},
        "text_bag, early stopping": {"text": {"train": {"model": "text_bag"}}},
    },
    "digits": {
        "lenet5, all 30 epochs": {"train": {"patience": 30}},
        "lenet5, early stopping": {},
    },
    "texts": {
        "text_encoder, all 4 epochs": {"text": {"train": {"max_epochs": 4}}, "train": {"patience": 4}},
        "text_encoder, early stopping": {},
        "text_encoder, early stopping, budget 20": {"text": {"train": {"max_epochs": 20}}},
    },
    "audio": {
        "conv1d, all 15 epochs": {"train": {"patience": 15}},
        "conv1d, early stopping": {},
    },
}


def project(data: str, changes: dict, source: Path | None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["latency_runs"] = 5
    if data in ("languages", "texts"):
        params["data"]["modality"] = "text"
    if data == "audio":
        params["data"]["modality"] = "audio"
    if data == "languages":
        params["text"]["ingest"]["source"] = str(source)
    params = merged(params, changes)
    root = Path(tempfile.mkdtemp(prefix="recipes_bench_"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", choices=CONFIGS)
    parser.add_argument("--config", action="append", help="only these configurations (names)")
    args = parser.parse_args()
    source = None
    if args.data == "languages":
        source = write_language_folder(Path(tempfile.mkdtemp(prefix="languages_")), 120, seed=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    for name, changes in CONFIGS[args.data].items():
        if args.config and name not in args.config:
            continue
        root = project(args.data, changes, source)
        wall = {}
        for stage in STAGES:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pipeline.stages", *stage_argv(stage)],
                                  cwd=root, env=env, capture_output=True, text=True)
            wall[stage] = round(time.perf_counter() - start, 1)
            if done.returncode != 0 and stage != "evaluate":  # a refusal is a result
                sys.exit(f"{name}: {stage} failed:\n{done.stderr}")
            if stage == "train":
                trained = done.stdout.strip().splitlines()[-1]
            if stage == "evaluate":
                refused = done.returncode != 0
        evaluation = json.loads((root / "reports/evaluation.json").read_text())
        print(json.dumps({
            "config": name, "changes": changes, "train": trained, "train_wall_s": wall["train"],
            "accuracy": evaluation["accuracy"],
            "baselines": {k: v["accuracy"] for k, v in evaluation.items()
                          if k.startswith("baseline_")},
            "selected": None if refused else evaluation["selected"],
            "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
