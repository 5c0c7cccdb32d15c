"""Stage 1: the data set as Parquet shards plus a manifest (pipeline/core/dataset.py has the
layout). The modality's `sources` part (pipeline/<data.modality>/sources.py) adds the items of its
source (images from image.ingest.source, texts from text.ingest.source) one at a time; this stage
opens the shards, runs it and reports the count per split. The manifest lists every class
folder, also one without files, so the validate stage can name it; an item's source is its path
relative to the source folder.

What a source folder may hold, what is skipped and what is refused: pipeline/core/folders.py.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.core.dataset import MANIFEST, ShardWriter
from pipeline.core.modality import part, preprocessing
from pipeline.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages ingest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    sources = part(params.data.modality, "sources")
    shutil.rmtree(args.out / "shards", ignore_errors=True)  # what an earlier run left: a
    (args.out / MANIFEST).unlink(missing_ok=True)           # failed run leaves no manifest
    with ShardWriter(args.out, params.ingest.shard_items, params.ingest.row_group_bytes) as out:
        counts = out.close(sources.ingest(params, out))
    unit = preprocessing(params.data.modality).UNIT
    print(f"ingest: {sum(counts.values())} {unit} from {sources.source(params)}: {counts}")
