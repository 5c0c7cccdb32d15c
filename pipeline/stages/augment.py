"""Stage 3: the preprocessing record of the training split, by the `augment` part of
data.modality (pipeline/core/modality.py Augment): how an item becomes model input, measured on
the ingested train split read a batch at a time (an image set's mean and std, a text set's
tokenizer). Output:
    preprocessing.json   the preprocessing record (pipeline/core/modality.py preprocessing())
                         every later consumer uses
    and the files that record names (its MODEL_FILES, e.g. a text model's tokenizer.json)
Augmentation itself happens while training reads the split (pipeline/core/stream.py): each
item's views drawn per (seed, epoch, view, item id), not stored.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.modality import part
from pipeline.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages augment")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    summary = part(params.data.modality, "augment").write_augmented(args.data, args.out, params)
    print(f"augment: {summary}")
