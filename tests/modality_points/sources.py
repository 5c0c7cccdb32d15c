"""The toy modality's ingest: "blobs", per_class points of each of 3 classes, Gaussian around
centres drawn with data.seed, split by data.split; one point an item, with the id
points/<split>/<class>/<n>.txt."""
from __future__ import annotations


import numpy as np

from pipeline import StageError
from pipeline.core.dataset import ShardWriter
from pipeline.params import Params

CLASSES = ("east", "north", "west")


def source(params: Params) -> str:
    return params.points.ingest.source


def ingest(params: Params, out: ShardWriter) -> list[str]:
    own = params.points.ingest
    if own.source != "blobs":
        raise StageError(f"points.ingest.source: {own.source!r}; the toy modality generates its "
                         "points ('blobs') only")
    rng = np.random.default_rng(params.data.seed)
    centres = rng.normal(0, 2.5, (len(CLASSES), own.features))
    n_train = round(own.per_class * params.data.split.train)
    n_val = round(own.per_class * params.data.split.val)
    for label, centre in zip(CLASSES, centres):
        for i, point in enumerate(centre + rng.normal(0, 1, (own.per_class, own.features))):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            out.add(f"points/{split}/{label}/{i}.txt", label, split, f"blobs/{label}/{i}",
                    (" ".join(f"{v:.6f}" for v in point) + "\n").encode())
    return list(CLASSES)
