"""The toy modality's augment part: the preprocessing record keeps the train split's mean and
std (points.preprocess.standardize); training sees each point and points.augment.copies
jittered views of it, the noise drawn per point, epoch and view."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.dataset import load_split
from pipeline.core.stream import item_rng
from pipeline.modalities.points.preprocess import PointsPreprocessing
from pipeline.params import Params


@dataclass(frozen=True)
class Views:
    prep: PointsPreprocessing
    copies: int
    noise: float
    seed: int

    @property
    def views(self) -> int:
        return 1 + self.copies

    def decode(self, data: list[bytes]) -> np.ndarray:
        return self.prep.normalize(np.stack([self.prep.load(item) for item in data]))

    def view(self, items: torch.Tensor, keys: np.ndarray, epoch: int, view: int) -> torch.Tensor:
        if view == 0:
            return items
        jitter = np.stack([item_rng(key, (self.seed, epoch, view)).standard_normal(
            items.shape[1], dtype=np.float32) for key in keys])
        return items + self.noise * torch.from_numpy(jitter).to(items.device)

    def to_input(self, items: torch.Tensor) -> torch.Tensor:
        return items


def augmenter(params: Params, prep: PointsPreprocessing, folder: Path) -> Views:
    p = params.points.augment
    return Views(prep, p.copies, p.noise, p.seed)


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
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    return f"{len(points)} training points, each seen with {own.augment.copies} jittered copies"
