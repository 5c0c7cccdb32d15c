"""Benchmark: wall time of the train stage and the test accuracy it reaches on the built-in data.
`python bench/train_stage_bench.py [--runs 3] [--set image.train.batch_size=512 ...]`.

Method:
- Once: params.yaml (with any --set section.key=value changes) is written into a temporary
  folder, and the ingest and augment stages run there (`python -m pipeline.stages ingest/augment`).
- Each run is a fresh Python process, as `dvc repro` starts one, that imports pipeline.stages.train
  (torch, DVCLive) and then times `pipeline.stages.train.main` with the dvc.yaml arguments, from call to
  return. That covers everything the stage does: reading the augmented tensors, moving them to the
  device (and so creating the CUDA context), building the model, every epoch with its validation
  pass, per-epoch checkpoint and DVCLive writes, and writing the model. Interpreter start and
  imports are excluded (issue 4's method). With --preimport, torch._dynamo too (torch imports it
  lazily inside the first optimizer step). The checkpoint folder is emptied before each run.
- Test accuracy: the written models/float on the test split, float32, on the CPU.
- KILN_BENCH_PROFILE=1 prints cProfile's top functions (cumulative) of each run (slower).
- Reported: each run (with the stage's first two and last epoch lines and its summary line),
  and the median of the stage seconds and of the test accuracy.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--data", "data/ingested", "--augmented", "data/augmented", "--out", "models/float",
              "--live", "reports/train", "--checkpoints", ".kiln/checkpoints/train"]


def child() -> None:
    """In the run's folder: time the train stage, then score its model on the test split."""
    sys.path.insert(0, str(REPO))
    import time

    import torch

    from pipeline.core import saved_model, training
    from pipeline.modalities.image import models as image_models
    from pipeline.stages import train
    from pipeline.core.dataset import load_split

    if os.environ.get("KILN_BENCH_PREIMPORT"):
        import torch._dynamo  # noqa: F401 - imported lazily by the first optimizer step

    profile = cProfile.Profile() if os.environ.get("KILN_BENCH_PROFILE") else None
    start = time.perf_counter()
    if profile:
        profile.enable()
    train.main(TRAIN_ARGS)
    if profile:
        profile.disable()
    seconds = time.perf_counter() - start
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    model, card = saved_model.load(Path("models/float"))
    pixels, labels = load_split(Path("data/ingested"), "test", card.preprocessing)
    x = image_models.to_input(pixels, card.preprocessing, torch.device("cpu"))
    accuracy = training.score(model.float().cpu(), [(x, torch.from_numpy(labels))])[1]
    print("RESULT " + json.dumps({"stage_s": seconds, "test_acc": accuracy,
                                  "device": str(training.pick_device())}), flush=True)


def with_changes(path: Path, changes: list[str]) -> dict:
    """params.yaml at `path` with each dotted KEY=VALUE change (a YAML value) applied."""
    params = yaml.safe_load(path.read_text())
    for change in changes:
        key, value = change.split("=", 1)
        *sections, name = key.split(".")
        section = params
        for part in sections:
            section = section.get(part, {})
        if name not in section:
            raise SystemExit(f"--set {change}: params.yaml has no {key}")
        section[name] = yaml.safe_load(value)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="DOTTED.KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--preimport", action="store_true",
                        help="import torch._dynamo before the clock starts: torch imports it (and "
                        "sympy, torch.fx) lazily at the first optimizer step, seconds where "
                        "bytecode is not cached")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "DVC_NO_ANALYTICS": "1",
           **({"KILN_BENCH_PREIMPORT": "1"} if args.preimport else {})}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "params.yaml").write_text(yaml.safe_dump(with_changes(REPO / "params.yaml", args.set), sort_keys=False))
        for stage in (["ingest", "--out", "data/ingested"],
                      ["augment", "--data", "data/ingested", "--out", "data/augmented"]):
            subprocess.run([sys.executable, "-m", "pipeline.stages", *stage], cwd=folder, env=env,
                           check=True, stdout=subprocess.DEVNULL)
        runs = []
        for run in range(args.runs):
            shutil.rmtree(folder / ".kiln", ignore_errors=True)
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"],
                                 cwd=folder, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"run {run} failed:\n{out.stdout}\n{out.stderr}")
            if os.environ.get("KILN_BENCH_PROFILE"):
                print(out.stdout.split("RESULT ", 1)[0][-12000:])
            result = json.loads(out.stdout.split("RESULT ", 1)[1])
            epochs = [line for line in out.stdout.splitlines() if line.startswith("epoch")]
            print("\n".join(["  " + line for line in dict.fromkeys(epochs[:2] + epochs[-1:])]
                            + [line for line in out.stdout.splitlines() if line.startswith("train:")]))
            runs.append(result)
            print(f"run {run}: train stage {result['stage_s']:.2f} s, test accuracy "
                  f"{result['test_acc']:.4f} on {result['device']}", flush=True)
    summary = {"changes": args.set, "preimport": args.preimport, "runs": runs,
               "median_stage_s": statistics.median(r["stage_s"] for r in runs),
               "median_test_acc": statistics.median(r["test_acc"] for r in runs)}
    print(f"median of {args.runs}: train stage {summary['median_stage_s']:.2f} s, test accuracy "
          f"{summary['median_test_acc']:.4f} ({' '.join(args.set) or 'params.yaml'}"
          f"{', torch._dynamo imported first' if args.preimport else ''})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
