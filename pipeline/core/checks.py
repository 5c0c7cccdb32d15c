"""The validate stage's data checks, one registry entry each: the expectation (Great
Expectations) one table must meet, the problem a failure means and how its offenders are named.

A check is a function (gx.expectations, Data) -> one expectation or a list, registered where it
is defined with `@CHECKS.check(key, words, ...)`; Data is what it checks: the params, the unit,
the class list:
    key      the problem's key in the details JSON `problems` (offender counts, 0 when clean)
    words    the words that start its error line ("{unit}"/"{one}": the modality's UNIT, e.g.
             images / image)
    table    the table it checks: items (one shard file's items, a row each with everything
             the modality's checks part describes: a Great Expectations batch per shard),
             data_set (every item, a row each with the columns the data-set checks, metrics
             and profile read: counts, shares, copies across shards and splits), classes,
             class_counts, drift (one row per feature)
    fatal    False: a failure is a warning, reported and not fatal
    name     (GX result dict, items table, column) -> the offenders' names; by default each
             failed row's source file and value
This file's CHECKS are every modality's (row count, manifest rows, labels, splits, leaks and
duplicates, classes, drift); each modality's checks part (pipeline/modalities/<name>/checks.py)
registers its own in its CHECKS, which the stage runs after these, table by table. A new check is
one entry in one of those files.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pandas as pd

from pipeline.core.copies import KEY
from pipeline.core.dataset import SPLITS
from pipeline.params import Params

TABLES = ("items", "data_set", "classes", "class_counts", "drift")
Namer = Callable[[dict, pd.DataFrame, "str | None"], list[str]]


def showing(shown: str) -> Namer:
    """Each failed row of the items table by its source file and `shown` filled in from the
    row's checked value (e.g. "{seconds:.2f} s")."""
    def name(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
        source = dict(zip(table.path, table.source))
        return [f"{source.get(r['path'], r['path'])} ({shown.format(**r)})"
                for r in res["unexpected_index_list"]]
    return name


def by_source(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    """Each failed row of the items table by its source file and the value found."""
    return showing(f"{column}={{{column}}}")(res, table, column)


@dataclass(frozen=True)
class Data:
    """What a check checks: the data set of `params`' modality."""
    params: Params
    unit: str             # what the modality calls its items (preprocessing's UNIT): images
    classes: list[str]    # manifest.json's class list
    same: str             # what makes two items the same (the checks part's SAME), in words

    @property
    def one(self) -> str:
        return self.unit[:-1]


@dataclass(frozen=True)
class Check:
    key: str
    words: str
    table: str
    expect: Callable[..., object]
    fatal: bool
    name: Namer

    def expectations(self, E, data: Data) -> list:
        """The check's expectations for `data`, each carrying in meta its key, its words and
        whether it is fatal (severity: critical, or warning)."""
        from great_expectations.expectations.metadata_types import FailureSeverity

        made = self.expect(E, data)
        made = made if isinstance(made, list) else [made]
        for expectation in made:
            expectation.meta = {"key": self.key.format(unit=data.unit, one=data.one),
                                "kind": self.words.format(unit=data.unit, one=data.one),
                                "fatal": self.fatal}
            expectation.severity = FailureSeverity.CRITICAL if self.fatal else \
                FailureSeverity.WARNING
        return made


class Checks:
    """The checks one file registers, in registration order."""

    def __init__(self) -> None:
        self._checks: list[Check] = []

    def check(self, key: str, words: str, table: str = "items", fatal: bool = True,
              name: Namer = by_source) -> Callable:
        """Decorator: register the expectation function it decorates as a check."""
        if table not in TABLES:
            raise ValueError(f"check {key!r}: table {table!r} is not one of {TABLES}")

        def register(expect: Callable) -> Callable:
            self._checks.append(Check(key, words, table, expect, fatal, name))
            return expect
        return register

    def __iter__(self) -> Iterator[Check]:
        return iter(self._checks)


CHECKS = Checks()


# ---- items -----------------------------------------------------------------------------------

def _found(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    return [f"found {res['observed_value']}"]


@CHECKS.check("{one}_count", "{one} count out of range", table="data_set", name=_found)
def row_count(E, d: Data):
    bounds = d.params.validate
    return E.ExpectTableRowCountToBeBetween(
        min_value=bounds.min_items, max_value=bounds.max_items,
        description=f"The data set holds {bounds.min_items} to {bounds.max_items} {d.unit} "
                    "(params validate.min_items, validate.max_items).")


@CHECKS.check("repeated_rows", "an item id given twice", table="data_set",
              name=showing("id {path}"))
def manifest_rows(E, d: Data):
    return E.ExpectColumnValuesToBeInSet(column="repeated", value_set=[False],
                                         description="Each item has an id of its own.")


@CHECKS.check("unknown_labels", "unknown label")
def labels(E, d: Data):
    return E.ExpectColumnValuesToBeInSet(column="label", value_set=d.classes,
                                         description="Every label is a class of the data set's class list.")


@CHECKS.check("unknown_splits", "unknown split")
def splits(E, d: Data):
    return E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                         description="Every split is train, val or test.")


def copies_named(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    """The groups of same items (the data_set table's content KEY) the failed rows belong to,
    each as its sources with their splits, train first (the copy's origin). Every copy is a
    named row of that table (path and source filled in)."""
    named = table[table.path.notna()]
    failed = named[named.path.isin({r["path"] for r in res["unexpected_index_list"]})]
    offenders = named.merge(failed[KEY].drop_duplicates(), on=KEY)
    offenders = offenders.assign(order=offenders.split.astype(str).map(SPLITS.index)
                                 ).sort_values(["order", "source"])
    groups = offenders.groupby(KEY, sort=False).apply(
        lambda g: " = ".join(f"{s} ({split})" for s, split in zip(g.source, g.split)),
        include_groups=False)
    return list(groups)


@CHECKS.check("leaked_{unit}", "same {one} in two splits (leakage)", table="data_set",
              name=copies_named)
def leaks(E, d: Data):
    return E.ExpectColumnValuesToBeInSet(
        column="leak", value_set=[False],
        description=f"No {d.one} appears in more than one split ({d.same}): a copy of a "
                    f"training {d.one} in val or test inflates the measured accuracy.")


@CHECKS.check("duplicate_{unit}", "duplicate {unit} in a split", table="data_set",
              name=copies_named)
def duplicates(E, d: Data):
    return E.ExpectColumnValuesToBeInSet(
        column="duplicate", value_set=[False],
        description=f"No two {d.unit} of one split are the same ({d.same}).")


def file_problems(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    """Each failed row's problem, source file and decode error (columns file_problem,
    decode_error): for a modality's unreadable-file check."""
    source = dict(zip(table.path, table.source))
    errors = table.set_index("path").decode_error
    return [f"{r['file_problem']}: {source[r['path']]} ({errors[r['path']]})"
            for r in res["unexpected_index_list"]]


# ---- classes and class_counts -----------------------------------------------------------------

@CHECKS.check("single_class", "single class", table="classes", name=_found)
def two_classes(E, d: Data):
    return E.ExpectTableRowCountToBeBetween(
        min_value=2,
        description="The data set has at least two classes: a classifier needs two.")


def _classes_named(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    return [f"class {r['label']!r} ({r[column]} {column})" for r in res["unexpected_index_list"]]


@CHECKS.check("empty_classes", "class with no {unit}", table="classes", name=_classes_named)
def no_empty_class(E, d: Data):
    return E.ExpectColumnValuesToBeBetween(
        column=d.unit, min_value=1,
        description=f"Every class of the data set's class list has at least one {d.one}.")


def _class_splits_named(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    return [f"{r['split']}/{r['label']} ({r[column]} {column})"
            for r in res["unexpected_index_list"]]


@CHECKS.check("short_class_splits", "class short of {unit} in a split", table="class_counts",
              name=_class_splits_named)
def class_in_every_split(E, d: Data):
    least = d.params.validate.min_items_per_class_per_split
    return E.ExpectColumnValuesToBeBetween(
        column=d.unit, min_value=least,
        description=f"Each class has at least {least} {d.unit} in each split "
                    "(params validate.min_items_per_class_per_split).")


# ---- drift from the champion's data (pipeline/core/drift.py) ---------------------------------

def by_feature(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    """Each failed feature with its score (PSI, KS)."""
    return [f"{r['feature']} {column.upper()} {r[column]:.3f}"
            for r in res["unexpected_index_list"]]


@CHECKS.check("drift", "drift from the champion's data", table="drift", name=by_feature)
def drift(E, d: Data):
    f = d.params.drift
    return [E.ExpectColumnValuesToBeBetween(
        column="psi", max_value=f.psi_fail,
        description=f"Population stability index below {f.psi_fail} (params drift.psi_fail)."),
        E.ExpectColumnValuesToBeBetween(
        column="ks", max_value=f.ks_fail,
        description=f"Kolmogorov-Smirnov distance below {f.ks_fail} (params drift.ks_fail).")]


@CHECKS.check("drift_warning", "drift warning", table="drift", fatal=False, name=by_feature)
def drift_warning(E, d: Data):
    f = d.params.drift
    return [E.ExpectColumnValuesToBeBetween(
        column="psi", max_value=f.psi_warn,
        description=f"Population stability index below {f.psi_warn} "
                    "(params drift.psi_warn; a warning only)."),
        E.ExpectColumnValuesToBeBetween(
        column="ks", max_value=f.ks_warn,
        description=f"Kolmogorov-Smirnov distance below {f.ks_warn} "
                    "(params drift.ks_warn; a warning only).")]
