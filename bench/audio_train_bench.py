"""Audio training and compression on the built-in spoken digits (eSpeak NG, voice-disjoint
splits): the augment, train and compress stages, then every variant scored on the test split's
unseen voices.

    .venv/bin/python bench/audio_train_bench.py [--set audio.train.model=cnn2d ...] [--ingested DIR]

Data: unless --ingested names an ingested audio folder (the ingest stage's output), the script
makes the built-in set with the real params.yaml (pipeline/modalities/audio/sources.py ingest_audio) as
the shards and manifest of a temporary folder (a ShardWriter with ingest.shard_items and
ingest.row_group_bytes, as the ingest stage opens it).

Each stage runs as dvc.yaml runs it (`python -m pipeline.stages <stage>`, a fresh process) in a
temporary project with the real params.yaml, data.modality audio, and --set changes. Reported:
the wall time of each stage's process (import and start-up included; one run; the train stage's
per-epoch lines are printed above), and for every ONNX variant (compress's float, pruned and
int8, plus `int8_frontend`: float.onnx quantised with the front end too, calibrated on the same
clips compress picks) its test accuracy (ONNX Runtime, 1 thread, the test split decoded by the
card's preprocessing), file size, and latency of one 1 s clip (batch 1, 1 thread, median of 200
runs after 3 warm-up runs: pipeline/stages/evaluate.py's median_latency_ms). MACs and pruned
widths come from compress.json. The machine's load is printed with the result
(`os.getloadavg`): on a shared 2-core machine it moves wall times.
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
from types import SimpleNamespace

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.text_bench import apply_sets  # noqa: E402
from pipeline.modalities.audio import export  # noqa: E402
from pipeline.modalities.audio.augment import augmenter  # noqa: E402
from pipeline.core.stream import sample_inputs  # noqa: E402
from pipeline.modalities.audio.sources import ingest_audio  # noqa: E402
from pipeline.core.card import onnx_predictor, read_card  # noqa: E402
from pipeline.stages.compress import quantize_int8  # noqa: E402
from pipeline.core.dataset import ShardWriter, load_split  # noqa: E402
from pipeline.stages.evaluate import median_latency_ms  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from tests.project import stage_argv  # noqa: E402

STAGES = ('augment', 'train', 'compress')  # run as dvc.yaml runs them (tests/project.py stage_argv)


def write_params(project: Path, changes: list[str]) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["modality"] = "audio"
    apply_sets(raw, changes)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def frontend_int8(project: Path) -> Path:
    """float.onnx statically quantised with its front end too, on compress's calibration clips
    (pipeline/core/stream.py sample_inputs, as pipeline/stages/compress.py draws them)."""
    params = load_params(project / "params.yaml")
    card = read_card(project / "models/float")
    views = augmenter(params, card.preprocessing, project / "models/float")
    x = sample_inputs(project / "data/ingested", "train", views,
                      params.compress.calibration_items, params.train.seed).numpy()
    everything = SimpleNamespace(INPUT=export.INPUT, int8_scope=lambda prepared, folder:
                                 (prepared, {}))
    out = project / "models/compressed/int8_frontend.onnx"
    quantize_int8(project / "models/compressed/float.onnx", out, x,
                  params.compress.int8_per_channel, params.compress.int8_reduce_range, everything)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], help="params key=value (YAML)")
    parser.add_argument("--ingested", type=Path)
    parser.add_argument("--keep", type=Path, help="copy the project folder here afterwards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        write_params(project, args.set)
        params = load_params(project / "params.yaml")
        data = project / "data/ingested"
        if args.ingested:
            shutil.copytree(args.ingested, data)
        else:
            a = params.audio.ingest
            with ShardWriter(data, params.ingest.shard_items, params.ingest.row_group_bytes) as out:
                out.close(ingest_audio(a.source, out, params.data.split, params.data.seed,
                                       params.ingest.max_file_bytes, a.voices, a.takes,
                                       a.speed_wpm, a.pitch))
        walls = {}
        for stage in STAGES:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pipeline.stages", *stage_argv(stage)],
                                  cwd=project, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  capture_output=True, text=True, check=False)
            walls[stage] = time.perf_counter() - start
            print(done.stdout, end="", flush=True)
            if done.returncode:
                sys.exit(f"{stage} failed:\n{done.stderr}")
        compressed = project / "models/compressed"
        card = read_card(project / "models/float")
        x, y = load_split(data, "test", card.preprocessing)
        variants = [compressed / f for f in ("float.onnx", "pruned.onnx", "int8.onnx")]
        variants.append(frontend_int8(project))
        report = json.loads((compressed / "compress.json").read_text())
        print(f"\nmodel {card.architecture}, changes {args.set}, val_acc {card.val.accuracy:.4f}; "
              f"{len(y)} test clips (unseen voices)")
        print("stage wall s: " + ", ".join(f"{s} {w:.1f}" for s, w in walls.items()))
        print(f"MACs {report['macs']} ({report['macs_of']}), params {report['params']}")
        print(f"pruned widths {report['pruned_widths']}")
        print("| variant | test accuracy | size (KB) | ms per clip (b1, 1 thread) |")
        print("|---|---:|---:|---:|")
        for path in variants:
            predict = onnx_predictor(path, 1)
            accuracy = float((predict(x).argmax(1) == y).mean())
            print(f"| {path.name} | {accuracy:.4f} | {path.stat().st_size / 1024:.1f} | "
                  f"{median_latency_ms(predict, x, 1, 200):.3f} |")
        print(f"load average {os.getloadavg()}")
        if args.keep:
            shutil.copytree(project, args.keep, dirs_exist_ok=True)


if __name__ == "__main__":
    main()
