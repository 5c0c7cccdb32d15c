"""The toy modality's augment part: the training points standardised (the preprocessing record
keeps the train split's mean and std), followed by points.augment.copies jittered copies."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.core.dataset import load_split
from pipeline.modalities.points.preprocess import PointsPreprocessing
from pipeline.params import Params


def write_augmented(data: Path, out: Path, params: Params) -> str:
    own = params.points
    features = own.ingest.features
    raw = PointsPreprocessing(features=features, mean=[0.0] * features, std=[1.0] * features)
    points, labels = load_split(data, "train", raw)
    prep = raw
    if own.preprocess.standardize:
        std = points.std(0)
        prep = dataclasses.replace(raw, mean=points.mean(0).round(6).tolist(),
                                   std=[round(float(s), 6) if s > 0 else 1.0 for s in std])
    x = torch.from_numpy(prep.normalize(points))
    g = torch.Generator().manual_seed(own.augment.seed)
    copies = [x + own.augment.noise * torch.randn(x.shape, generator=g)
              for _ in range(own.augment.copies)]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"points": torch.cat([x, *copies]).contiguous(),
               "labels": torch.from_numpy(labels).repeat(own.augment.copies + 1).contiguous()},
              out / "train.safetensors")
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    return f"{len(points)} training points -> {len(points) * (own.augment.copies + 1)}"
