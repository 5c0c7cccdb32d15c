"""Stage 1: materialise the data set as files plus a manifest (pipeline/core/dataset.py has the
layout). The modality's `sources` part (pipeline/<data.modality>/sources.py) reads its source
(images from image.ingest.source, texts from text.ingest.source) into that layout; this stage runs it and
reports the count per split. classes.json lists every class folder, also one without files, so
the validate stage can name it; a manifest row's source is relative to the source folder.

What a source folder may hold, what is skipped and what is refused: pipeline/core/folders.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.dataset import SPLITS
from pipeline.core.modality import part, preprocessing
from pipeline.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages ingest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    sources = part(params.data.modality, "sources")
    rows = sources.ingest(params, args.out)
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    print(f"ingest: {len(rows)} {preprocessing(params.data.modality).UNIT} from {sources.source(params)}: {counts}")
