"""Benchmark of the validate stage on 60,000 generated 32x32 grayscale PNGs (10 classes).

    python bench/validate_bench.py [--images 60000] [--runs 3] [--out /tmp/kiln_validate_bench]

Method: the images are written once as an ingested folder (pipeline/core/dataset.py: Parquet
shards cut at ingest.shard_items and ingest.row_group_bytes, as the ingest stage writes them, and
manifest.json; one PNG per item: smooth random blobs plus noise, all distinct). Then `validate()`
runs end to end with the repo's params.yaml (read, decode + hash every item, the GX suites, Data
Docs), alternating the baseline (engine.workers = 1: one process) with the default
(engine.workers = 0: one process per core), `--runs` times each; the median wall time of each is
reported, with the decode/hash share measured separately (checks.shard_table of every shard alone, reading the shards
included) and the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import resource
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.dataset import SPLITS, read_manifest, shard_files, write_items
from pipeline.params import Params, load_params
from pipeline.core import executor
from pipeline.modalities.image import checks
from pipeline.stages.validate import validate

REPO = Path(__file__).resolve().parent.parent
SIDE = 32       # px
CLASSES = 10


def _make_chunk(args: tuple[int, int]) -> list[tuple[dict, bytes]]:
    start, stop = args
    items = []
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        label = str(i % CLASSES)
        j = (i // CLASSES) % 10  # 7 in 10 of each class to train, 1 to val, 2 to test
        split = SPLITS[0 if j < 7 else 1 if j < 8 else 2]
        coarse = rng.integers(0, 256, (8, 8)).astype(np.float32)
        image = np.kron(coarse, np.ones((4, 4), np.float32)) + rng.normal(0, 12, (SIDE, SIDE))
        item_id = f"images/{split}/{label}/{i:05d}.png"
        png = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(png, format="PNG")
        items.append(({"id": item_id, "label": label, "split": split, "source": item_id},
                      png.getvalue()))
    return items


def generate(root: Path, n: int, params: Params) -> None:
    """An ingested folder of n images, skipped when it already holds them."""
    if (root / "manifest.json").exists() and len(read_manifest(root)[0]) == n:
        return
    shutil.rmtree(root / "shards", ignore_errors=True)  # what an earlier run left
    step = 2000
    with ProcessPoolExecutor() as pool:
        parts = pool.map(_make_chunk, [(s, min(s + step, n)) for s in range(0, n, step)])
        items = (item for part in parts for item in part)
        write_items(root, items, [str(c) for c in range(CLASSES)], params.ingest.shard_items,
                    params.ingest.row_group_bytes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kiln_validate_bench"))
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    data = args.out / "ingested"
    t = time.perf_counter()
    generate(data, args.images, params)
    print(f"data: {args.images} images in {data} ({time.perf_counter() - t:.1f} s to make or find)")
    load_before = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    settings = {"baseline workers=1": 1, f"workers=0 ({cores} processes)": 0}
    wall: dict[str, list[float]] = {name: [] for name in settings}
    decode: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.runs):
        for name, workers in settings.items():
            executor.start(dataclasses.replace(params.engine, workers=workers))
            t = time.perf_counter()
            for split in SPLITS:
                for shard in shard_files(data, split):
                    checks.shard_table(shard, params)
            decode[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            result = validate(data, args.out / "docs", params, reference=None)
            wall[name].append(time.perf_counter() - t)
            assert result.success, result.failures
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{os.cpu_count()} cores")
    # ru_maxrss is in KiB on Linux; children = the largest pool worker
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak resident memory: this process {own:.0f} MiB, largest worker {worker:.0f} MiB")
    print("| setting | validate() wall, median (s) | images/s | decode+hash only, median (s) | runs (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name in settings:
        median = statistics.median(wall[name])
        print(f"| {name} | {median:.2f} | {args.images / median:,.0f} | "
              f"{statistics.median(decode[name]):.2f} | {', '.join(f'{w:.2f}' for w in wall[name])} |")


if __name__ == "__main__":
    main()
