"""Data drift against the champion: reference statistics (a data profile) and their comparison.

The validate stage writes the profile of the train split it checked; the package stage stores it
inside the model (pipeline/lifecycle/champion.py REFERENCE_FILE, next to model.onnx). The next run's
validate compares its own train split with its task's champion's profile, feature by feature.
Which features a profile holds is the modality's choice (its `checks` part; for images: label,
image size, channels, brightness, contrast); every profile has
    categorical   feature -> {value: count}, scored by PSI (label is always one)
    quantiles     feature -> PROFILE_QUANTILES quantiles of a continuous feature, PSI and KS
PSI (population stability index) = sum over bins of (new - ref) * ln(new / ref), bin shares
floored at PSI_FLOOR; continuous features use the reference's quantile bins (drift.psi_bins of
equal reference mass). KS is the largest gap between the two cumulative distributions.
Continuous features are stored as PROFILE_QUANTILES quantiles of the actual values (no
interpolation), so a profile stays a few tens of KB at any data-set size and ties (blank images,
one image size) keep their weight; KS and PSI computed from them are within 1/PROFILE_QUANTILES.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import StageError
from pipeline.params import DriftParams

PROFILE_VERSION = 1
PROFILE_QUANTILES = 1001  # quantile points stored per continuous feature (every 0.1 %)
PSI_FLOOR = 1e-4          # share given to a bin one side leaves empty, so ln() stays finite


def counted(column: pd.Series) -> dict[str, int]:
    """value -> count of the values `column` holds, by value: a categorical column's categories
    that no row of it holds are left out."""
    return {str(k): int(v) for k, v in column.value_counts().sort_index().items() if v}


def _psi(ref: np.ndarray, new: np.ndarray) -> float:
    ref, new = np.maximum(ref, PSI_FLOOR), np.maximum(new, PSI_FLOOR)
    return float(np.sum((new - ref) * np.log(new / ref)))


def _cdf(quantiles: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Share of the distribution <= x, read off its stored quantiles."""
    return np.searchsorted(quantiles, x, side="right") / len(quantiles)


def categorical_psi(ref: dict[str, int], new: dict[str, int]) -> float:
    keys = sorted(set(ref) | set(new))
    r = np.array([ref.get(k, 0) for k in keys], float)
    n = np.array([new.get(k, 0) for k in keys], float)
    return _psi(r / max(r.sum(), 1), n / max(n.sum(), 1))


def continuous_scores(ref: list[float], new: list[float], bins: int) -> tuple[float, float]:
    """(PSI over `bins` equal-mass reference bins, KS distance) of two quantile profiles."""
    ref_q, new_q = np.asarray(ref), np.asarray(new)
    edges = np.unique(np.quantile(ref_q, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf"))
    share = lambda q: np.diff(np.concatenate([[0.0], _cdf(q, edges), [1.0]]))  # noqa: E731
    points = np.union1d(ref_q, new_q)
    ks = float(np.max(np.abs(_cdf(ref_q, points) - _cdf(new_q, points))))
    return _psi(share(ref_q), share(new_q)), ks


@dataclass(frozen=True)
class DriftReport:
    scores: dict[str, tuple[float, float | None]]   # feature -> (PSI, KS or None)
    thresholds: DriftParams
    classes_added: list[str]
    classes_removed: list[str]

    def table(self) -> pd.DataFrame:
        """One row per feature, the table the validate stage's drift suite checks."""
        return pd.DataFrame([{"feature": f, "psi": round(psi, 4),
                              "ks": None if ks is None else round(ks, 4)}
                             for f, (psi, ks) in self.scores.items()]).astype({"ks": float})

    def metrics(self, warned: bool, failed: bool) -> dict:
        return {
            "status": "fail" if failed else "warn" if warned else "ok",
            "features": {f: {"psi": round(psi, 4), "ks": None if ks is None else round(ks, 4)}
                         for f, (psi, ks) in self.scores.items()},
            "classes_added": self.classes_added,
            "classes_removed": self.classes_removed,
        }


def compare(reference: dict, current: dict, thresholds: DriftParams,
            categorical: tuple[str, ...], continuous: tuple[str, ...]) -> DriftReport:
    """Score `current` (a profile) against `reference` (the champion's profile), feature by
    feature: `categorical` and `continuous` name them (the modality's `checks` part passes its
    own)."""
    if reference.get("version") != PROFILE_VERSION:
        raise StageError(f"champion's data profile: version "
                         f"{reference.get('version')!r}; this Kiln reads version {PROFILE_VERSION}")
    scores: dict[str, tuple[float, float | None]] = {}
    for name in categorical:
        scores[name] = (categorical_psi(reference["categorical"][name],
                                        current["categorical"][name]), None)
    for name in continuous:
        if reference["quantiles"][name] and current["quantiles"][name]:
            scores[name] = continuous_scores(reference["quantiles"][name],
                                             current["quantiles"][name], thresholds.psi_bins)
    ref_labels = set(reference["categorical"]["label"])
    new_labels = set(current["categorical"]["label"])
    return DriftReport(scores=scores, thresholds=thresholds,
                       classes_added=sorted(new_labels - ref_labels),
                       classes_removed=sorted(ref_labels - new_labels))
