"""Kiln at scale: peak memory, wall time and items/s of every stage, and DVC's cost, as the
built-in generated image set, or a generated set of texts or clips, grows (issue "Data past
memory").

    python bench/scale_bench.py [--sizes 10000 100000] [--stages ingest validate ...]
                                [--epochs 2] [--out /tmp/kiln_scale] [--no-dvc]
                                [--modality image|text|audio]

Method, per size N (one after the other, in a fresh project each):
- The project: this checkout's tracked and untracked-not-ignored files copied to OUT/N/project
  (a git repository, DVC initialised with a local remote OUT/N/remote; .venv linked), params.yaml
  with data.modality image, image.ingest.source warped_digits and image.ingest.warped_items N
  (pipeline/modalities/image/warped.py: generated offline, deterministic), the image model's
  max_epochs and compress.finetune_epochs set to --epochs, the real params otherwise. With
  --modality text: N generated texts (4 made-up topics, 8 to 40 words each, a topic's own words
  among shared ones, seeded: generated_texts) in one .jsonl file, OUT/N/texts.jsonl, as a
  user's records source;
  with --modality audio: N generated one-second 16-bit WAVs at 16 kHz (5 classes of two tones
  each, their pitch, level and noise drawn per clip, seeded) in class folders, OUT/N/clips.
- Each stage runs once, in dvc.yaml's order, by `dvc repro --single-item <stage>`. A sampler
  polls the stage's process tree every 0.1 s (psutil: the `python -m pipeline.stages` process
  and every descendant, the executor's workers included) and keeps the largest sum of their
  RSS: "peak MB". Wall seconds are the `dvc repro` command's; items/s is N over them (every
  stage reads every item or, for train, epochs x the train split: both columns are printed).
- DVC, after the run: `dvc status <the stages run>` with nothing changed (median of 3 runs), `dvc push` to the
  local remote, `dvc pull` into a fresh `git clone` of the project (its own cache; the time of
  `dvc pull` alone), and growth: warped_items raised by 1%, `dvc repro ingest`, `dvc push`, and
  the number of files the push sent (files in the remote before and after).
Results print as markdown rows and go to OUT/results.json. One run per size: the memory
figures do not depend on machine load; times do (the machine is noted in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "validate", "augment", "train", "compress", "evaluate", "package")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "BENTOML_DO_NOT_TRACK": "True", "DO_NOT_TRACK": "1",
       "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}


def run(cwd: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=env or ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} in {cwd} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


SYLLABLES = "ka lo mi ren tu sha vo pel dri nu qua zen".split()
SHARED = "the a of and to in is was it for on with as by at from that this".split()


def generated_texts(path: Path, n: int) -> None:
    """n texts of 4 made-up topics as a .jsonl records source (fields text, label): each topic
    has 400 words of its own (2-3 syllables), drawn Zipf-like among shared function words."""
    rng = np.random.default_rng(24)
    words = [a + b for a in SYLLABLES for b in SYLLABLES] + \
        [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]
    topics = {name: rng.choice(words, 400, replace=False)
              for name in ("tides", "looms", "comets", "bread")}
    weights = 1 / np.arange(1, 401)
    weights /= weights.sum()
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            name = list(topics)[i % len(topics)]
            length = int(rng.integers(8, 41))
            own = rng.choice(topics[name], length, p=weights)
            shared = rng.choice(SHARED, length)
            text = " ".join(o if rng.random() < 0.5 else w for o, w in zip(own, shared))
            out.write(json.dumps({"text": text, "label": name}) + "\n")


CLIP_RATE = 16000  # Hz the generated clips are recorded at


def generated_clips(folder: Path, n: int) -> None:
    """n one-second WAVs of 5 classes (each two tones), in <class>/<i>.wav folders."""
    import soundfile

    rng = np.random.default_rng(24)
    rate = CLIP_RATE
    t = np.arange(rate) / rate
    for i in range(n):
        label = i % 5
        low = (180 + 60 * label) * rng.uniform(0.95, 1.05)
        wave = np.sin(2 * np.pi * low * t) + 0.5 * np.sin(2 * np.pi * 2.7 * low * t)
        wave = rng.uniform(0.1, 0.6) * wave / 1.5 + rng.normal(0, 0.01, rate)
        path = folder / f"class{label}" / f"{i:07d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, wave.astype(np.float32), rate, subtype="PCM_16")


def project(root: Path, n: int, epochs: int, modality: str) -> Path:
    """A fresh git + DVC project of this checkout's files with the generated source of n items."""
    files = run(REPO, "git", "ls-files", "-co", "--exclude-standard").stdout.split()
    work = root / "project"
    for name in files:
        if (REPO / name).is_file() and not name.startswith(("data/", "models/", "reports/")):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    (work / ".venv").symlink_to(REPO / ".venv")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["modality"] = modality
    if modality == "image":
        params["image"]["ingest"].update(source="warped_digits", warped_items=n)
    elif modality == "text":
        generated_texts(root / "texts.jsonl", n)
        params["text"]["ingest"]["source"] = str(root / "texts.jsonl")
    else:
        generated_clips(root / "clips", n)
        params["audio"]["ingest"]["source"] = str(root / "clips")
    params[modality]["train"]["max_epochs"] = epochs
    params["compress"]["finetune_epochs"] = epochs
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(work, "git", "init", "-q")
    run(work, "git", "add", "-A")
    run(work, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm",
        "bench project")
    run(work, "dvc", "remote", "add", "-d", "local", str(root / "remote"))
    return work


def stage_tree(dvc: psutil.Process) -> list[psutil.Process]:
    """The `python -m pipeline.stages` process under `dvc` and all its descendants."""
    try:
        for child in dvc.children(recursive=True):
            if "pipeline.stages" in " ".join(child.cmdline()):
                return [child, *child.children(recursive=True)]
    except psutil.Error:
        pass
    return []


def measured(work: Path, stage: str) -> dict:
    """One stage through `dvc repro --single-item`: wall seconds and peak summed RSS (MB)."""
    start = time.perf_counter()
    dvc = psutil.Popen(["dvc", "repro", "--single-item", stage], cwd=work, env={
        **ENV, "BENTOML_HOME": str(work / ".bentoml")}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            total = 0
            for p in stage_tree(dvc):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = dvc.communicate()[0]
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if dvc.returncode != 0:
        raise SystemExit(f"dvc repro {stage} failed ({dvc.returncode}):\n{out[-5000:]}")
    return {"wall_s": round(wall, 1), "peak_mb": round(peak / 2**20), "log": out[-2000:]}


def remote_files(root: Path) -> set[str]:
    return {p.relative_to(root / "remote").as_posix() for p in (root / "remote").rglob("*")
            if p.is_file()}


def dvc_costs(root: Path, work: Path, n: int, stages: list[str]) -> dict:
    statuses = []
    for _ in range(3):
        start = time.perf_counter()
        out = run(work, "dvc", "status", *stages).stdout
        statuses.append(time.perf_counter() - start)
    assert "up to date" in out, out
    start = time.perf_counter()
    run(work, "dvc", "push")
    push = time.perf_counter() - start
    clone = root / "clone"
    run(root, "git", "clone", "-q", str(work), str(clone))
    run(work, "git", "add", "-A")
    run(work, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm",
        "a run")
    run(clone, "git", "pull", "-q")
    start = time.perf_counter()
    run(clone, "dvc", "pull", "data/ingested")
    pull = time.perf_counter() - start
    shutil.rmtree(clone)
    before = remote_files(root)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["image"]["ingest"]["warped_items"] = n + n // 100
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(work, "dvc", "repro", "--single-item", "ingest")
    start = time.perf_counter()
    run(work, "dvc", "push", "data/ingested")
    grown_push = time.perf_counter() - start
    sent = remote_files(root) - before
    shards = len(list((work / "data/ingested/shards").rglob("*.parquet")))
    return {"status_s": round(statistics.median(statuses), 2), "push_s": round(push, 1),
            "pull_s": round(pull, 1), "grown_push_s": round(grown_push, 1),
            "grown_files_sent": len(sent), "shards_after_growth": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kiln_scale"))
    parser.add_argument("--no-dvc", action="store_true", help="skip the DVC costs")
    parser.add_argument("--modality", choices=("image", "text", "audio"), default="image")
    args = parser.parse_args()
    results = {}
    print("| items | stage | wall s | items/s | peak MB |\n|---:|---|---:|---:|---:|")
    for n in args.sizes:
        root = args.out / str(n)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        work = project(root, n, args.epochs, args.modality)
        results[n] = {"stages": {}}
        for stage in STAGES:
            if stage not in args.stages:
                continue
            m = measured(work, stage)
            results[n]["stages"][stage] = {k: v for k, v in m.items() if k != "log"}
            print(f"| {n:,} | {stage} | {m['wall_s']} | {n / m['wall_s']:,.0f} | "
                  f"{m['peak_mb']:,} |", flush=True)
        if not args.no_dvc and "ingest" in args.stages:
            results[n]["dvc"] = dvc_costs(root, work, n,
                                          [s for s in STAGES if s in args.stages])
            print(f"dvc at {n:,}: {results[n]['dvc']}", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
