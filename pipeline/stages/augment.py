"""Stage 3: seeded, batched augmentation of the training split, by the `augment` part of
data.modality (pipeline/core/modality.py Augment; e.g. random warps of images, deletion, swap and
masking of a text's token ids). Output, loadable without pickle:
    train.safetensors    labels int64 (N,) and the modality's inputs (images uint8 (N, C, S, S),
                         or token ids int64 (N, L)): the originals first, then the copies
    preprocessing.json   the preprocessing record (pipeline/core/modality.py preprocessing()) every later
                         consumer uses
    and the files that record names (its MODEL_FILES, e.g. a text model's tokenizer.json)
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
