"""How a point becomes model input, saved in every card of a points model: its numbers as
float32, standardised by the train split's mean and std. Light (numpy): the service uses it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PointsPreprocessing:
    features: int
    mean: list[float]  # of the train split, per feature (0 without points.preprocess.standardize)
    std: list[float]   # (1 without)

    UNIT = "points"
    MODEL_FILES = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def load(self, source: Path | bytes) -> np.ndarray:
        """One point file (path or bytes: an ingested item) -> float32 (features,); ValueError
        when it is no point."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return parse(data.decode("utf-8"), self.features)

    def normalize(self, points: np.ndarray) -> np.ndarray:
        return ((np.asarray(points, np.float32) - np.float32(self.mean))
                / np.float32(self.std)).astype(np.float32)


def parse(text: str, features: int) -> np.ndarray:
    """A line of `features` numbers -> float32 (features,); ValueError naming what is wrong."""
    values = np.array([float(v) for v in text.split()], np.float32)
    if values.shape != (features,):
        raise ValueError(f"{len(values)} numbers, expected {features}")
    return values


RECORD = PointsPreprocessing
