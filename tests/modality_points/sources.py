"""The toy modality's ingest: "blobs", per_class points of each of 3 classes, Gaussian around
centres drawn with data.seed, split by data.split; points/<split>/<class>/<n>.txt, one point a
file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import StageError
from pipeline.core.dataset import write_manifest
from pipeline.params import Params

CLASSES = ("east", "north", "west")


def source(params: Params) -> str:
    return params.points.ingest.source


def ingest(params: Params, out: Path) -> list[dict]:
    own = params.points.ingest
    if own.source != "blobs":
        raise StageError(f"points.ingest.source: {own.source!r}; the toy modality generates its "
                         "points ('blobs') only")
    rng = np.random.default_rng(params.data.seed)
    centres = rng.normal(0, 2.5, (len(CLASSES), own.features))
    n_train = round(own.per_class * params.data.split.train)
    n_val = round(own.per_class * params.data.split.val)
    rows = []
    for label, centre in zip(CLASSES, centres):
        for i, point in enumerate(centre + rng.normal(0, 1, (own.per_class, own.features))):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            path = Path("points", split, label, f"{i}.txt")
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_text(" ".join(f"{v:.6f}" for v in point) + "\n")
            rows.append({"path": path.as_posix(), "label": label, "split": split,
                         "source": f"blobs/{label}/{i}"})
    write_manifest(out, rows, list(CLASSES))
    return rows
