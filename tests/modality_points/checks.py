"""The toy modality's validate part: the points table, its Great Expectations checks, the data
profile and drift features (pipeline/core/checks.py has the checks every modality has)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.checks import Checks, Data, file_problems
from pipeline.core.drift import PROFILE_QUANTILES, PROFILE_VERSION, compare, counted
from pipeline.core.dataset import described_table
from pipeline.modalities.points.preprocess import parse
from pipeline.params import Params

COLUMNS = ["path", "source", "label", "split", "file_problem", "decode_error", "largest",
           "content_hash"]
SUMMARY = ("points", "classes", "splits", "undecodable", "checks_passed", "checks_failed",
           "success")
METRICS = ("points", "classes", "splits", "undecodable", "checks_passed", "checks_failed",
           "problems", "drift", "success")
SAME = "compared by their coordinates"
CHECKS = Checks()
CATEGORICAL, CONTINUOUS = ("label",), ("largest",)
MERGED, FLAGS = ("file_problem", "largest"), ()


def describe_point(data: bytes, features: int) -> dict:
    try:
        point = parse(data.decode("utf-8"), features)
    except (UnicodeDecodeError, ValueError) as e:
        return {"file_problem": "not a point", "decode_error": f"{type(e).__name__}: {e}"}
    if not np.isfinite(point).all():
        return {"file_problem": "not a point", "decode_error": "a value is not finite"}
    return {"file_problem": None, "decode_error": None, "largest": float(np.abs(point).max()),
            "content_hash": point.tobytes().hex()}


def shard_table(shard: Path, params: Params):
    table = described_table(shard, functools.partial(
        describe_point, features=params.points.ingest.features), COLUMNS)
    table = table.astype({"largest": float})
    return table.assign(alike=table.content_hash.notna()), None


def conclude(table: pd.DataFrame, extras: list, params: Params, reference: dict | None):
    current = profile(table[table.split == "train"])
    report = compare(reference, current, params.drift, CATEGORICAL, CONTINUOUS) \
        if reference is not None else None
    return current, report


def profile(table: pd.DataFrame) -> dict:
    decoded = table[table.file_problem.isna()]
    return {"version": PROFILE_VERSION, "modality": "points", "points": len(decoded),
            "categorical": {"label": counted(decoded.label)},
            "quantiles": {"largest": np.quantile(
                decoded.largest.to_numpy(float), np.linspace(0, 1, PROFILE_QUANTILES),
                method="inverted_cdf").round(4).tolist() if len(decoded) else []}}


@CHECKS.check("unreadable_points", "not a point", name=file_problems)
def decodes(E, d: Data):
    return E.ExpectColumnValuesToBeNull(
        column="file_problem",
        description=f"Every file is one line of {d.params.points.ingest.features} finite numbers.")


@CHECKS.check("large_values", "coordinate out of bounds")
def bounded(E, d: Data):
    max_abs = d.params.points.validate.max_abs
    return E.ExpectColumnValuesToBeBetween(
        column="largest", max_value=max_abs,
        description=f"No coordinate is larger in magnitude than {max_abs:g} "
                    "(params points.validate.max_abs).")


def metrics(table: pd.DataFrame, params: Params) -> dict:
    return {"points": len(table), "undecodable": int(table.file_problem.notna().sum())}


def lines(metrics: dict, params: Params) -> list[str]:
    return []
