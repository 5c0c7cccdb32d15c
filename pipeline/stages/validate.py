"""Stage 2: describe every ingested item and check the data set with Great Expectations suites.

Items are described a shard file at a time (the modality's `checks` part,
pipeline/modalities/<data.modality>/checks.py, in parallel through the executor), so memory does
not grow with the items' descriptions. Tables validated, all in an in-memory (ephemeral) GX
context:
    <unit>         one batch per shard file: a row per item of the shard with everything the
                   part describes (path, source, label, split, file_problem and decode_error,
                   content_hash, what the modality measures): the checks of single items
    data_set       one row per item of the whole data set with what the data-set checks,
                   metrics and profile read: label, split, the part's MERGED columns and FLAGS,
                   leak, duplicate and repeated (copies across shards and splits, found from
                   128-bit keys: pipeline/core/copies.py), and path and source for the rows
                   flagged (read back from the shards' id and source columns)
    classes        one row per class of manifest.json: <unit> (all splits)
    class_counts   one row per (split, class) of every class that has items: <unit> (0 included)
    drift          one row per feature compared with the reference of the task's champion
                   (pipeline/core/drift.py, pipeline/lifecycle/champion.py): same model name and class list

The checks are registry entries (pipeline/core/checks.py): those every modality shares (row
count, ids, labels, splits, leaks, duplicates, classes, PSI/KS drift) and the part's CHECKS.
The part gives the shard tables, its checks, the data profile and drift features, the metrics
it adds and what more to print; this stage runs the checks and reports.

Each expectation carries a `kind` (meta): the problem in plain words, which starts its line in
the error message, and a key under `problems` in the details JSON (offender counts over every
batch, 0 when clean). The metrics JSON holds the counts a person compares across runs (the
part's SUMMARY: items, splits, checks passed and failed). Both, the Data Docs site (the same
bytes on a rerun with the same data: pipeline/core/data_docs.py) and the data profile are
written even when a check fails, so the reader can see why; a failure then raises StageError
with one line per failed kind naming a few offending files or classes.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pandas as pd

from pipeline import StageError
from pipeline.lifecycle.champion import Exports, Task, reference
from pipeline.core.checks import CHECKS, Check, Data
from pipeline.core.copies import ID, KEY, copies, keys, repeated
from pipeline.core.dataset import MANIFEST, SPLITS, classes_of, data_hash, named_rows, shard_files
from pipeline.core.modality import part, preprocessing
from pipeline.params import Params, load_params

DOCS_SITE = "kiln"
DATA_SOURCE = "kiln"  # GX's name for where a batch came from; its pages are <it>-<asset>.html
SHOWN = 3  # offenders named per failed kind; the count covers the rest
# what names an item: the shard tables keep them for every row, the data_set table for the
# rows its checks can name
NAMES = ["path", "source"]


@dataclass(frozen=True)
class Validation:
    success: bool
    metrics: dict
    failures: list[str]   # one line per failed kind, naming offenders
    warnings: list[str]   # drift above the warn thresholds: reported, not fatal
    table: pd.DataFrame   # the data_set table: a row per item (module docstring)
    profile: dict         # reference statistics of this data set's train split (pipeline/core/drift.py)


@dataclass
class Outcome:
    """One expectation over every batch it ran on: passed in all, or its offenders."""
    expectation: object   # GX's, with its meta and description
    check: Check
    success: bool = True
    count: int | None = None  # rows that broke it; None for a check of a whole table
    named: list[str] = field(default_factory=list)  # the first SHOWN offenders' words
    names: int = 0        # how many words there were in all

    def add(self, result, table: pd.DataFrame) -> None:
        """Count in one batch's result; `table` is that batch, which names the offenders."""
        if result.success:
            return
        self.success = False
        res = result.result
        if "unexpected_index_list" in res:
            self.count = (self.count or 0) + len(res["unexpected_index_list"])
        words = self.check.name(res, table, result.expectation_config.kwargs.get("column"))
        self.named.extend(words[:SHOWN - len(self.named)])
        self.names += len(words)

    @property
    def line(self) -> str:
        """'<kind>: <rule> -- <n> break it: a; b; c (+k more)'."""
        counted = f"{self.count} break it: " if self.count is not None else ""
        line = (f"{self.expectation.meta['kind']}: {self.expectation.description} -- {counted}"
                f"{'; '.join(self.named)}")
        return line + (f" (+{self.names - SHOWN} more)" if self.names > SHOWN else "")


def class_tables(table: pd.DataFrame, classes: list[str], unit: str
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(classes: label, <unit>) and (class_counts: split, label, <unit>) with zeros included for
    every class that has files somewhere; an empty class is the classes table's finding. `unit`
    names the count column: images, or texts."""
    per_class = table.label.value_counts()
    class_table = pd.DataFrame({"label": classes,
                                unit: [int(per_class.get(c, 0)) for c in classes]})
    present = [c for c in classes if per_class.get(c, 0) > 0]
    grid = pd.MultiIndex.from_product([list(SPLITS), present], names=["split", "label"])
    counts = table.groupby(["split", "label"], observed=True).size().reindex(grid, fill_value=0)
    return class_table, counts.rename(unit).reset_index()


def registered(checks: ModuleType, data: Data) -> dict[str, Check]:
    """Every check of a run, the shared ones (pipeline/core/checks.py) first, by its key."""
    every = {}
    for check in (*CHECKS, *checks.CHECKS):
        key = check.key.format(unit=data.unit, one=data.one)
        if key in every:
            raise ValueError(f"check key {key!r} is registered twice")
        every[key] = check
    return every


def kept(shard: pd.DataFrame, checks: ModuleType) -> pd.DataFrame:
    """What the data_set table keeps of a shard's rows: label, split, the part's MERGED and
    FLAGS, alike, and the keys of content and id; no string per item (words are categorical:
    a byte an item where a column holds few values)."""
    rows = shard[["label", "split", *checks.MERGED, *checks.FLAGS, "alike"]].reset_index(drop=True)
    for column in rows:
        if rows[column].dtype == object or pd.api.types.is_string_dtype(rows[column]):
            rows[column] = rows[column].astype("category")
    rows[KEY] = keys(shard.content_hash)
    rows[ID] = keys(shard.path)
    return rows


def data_set_table(folder: Path, kept_rows: list[pd.DataFrame], checks: ModuleType
                   ) -> pd.DataFrame:
    """Every shard's kept rows, in shard order, with leak, duplicate and repeated, and path and
    source read back for the rows a data-set check or metric can name (a FLAGS column, leak,
    duplicate or repeated true). Joined a column at a time, each shard's copy let go as it
    joins (`kept_rows` is emptied): the table is never held twice."""
    columns = {}
    for name in list(kept_rows[0].columns):
        parts = [rows.pop(name) for rows in kept_rows]
        if isinstance(parts[0].dtype, pd.CategoricalDtype):  # (a shard of None has no words)
            columns[name] = pd.api.types.union_categoricals(
                [values.cat.set_categories(values.cat.categories.astype("str")) for values in parts],
                sort_categories=True)
        else:
            columns[name] = pd.concat(parts, ignore_index=True)
        del parts
    kept_rows.clear()
    table = pd.DataFrame(columns)
    del columns
    table["leak"], table["duplicate"] = copies(table, table.alike)
    table["repeated"] = repeated(table)
    table = table.drop(columns=ID)
    flagged = table[[*checks.FLAGS, "leak", "duplicate", "repeated"]].any(axis=1).to_numpy()
    names = {column: pd.Series(None, index=table.index, dtype=object) for column in NAMES}
    if flagged.any():
        names["path"][flagged], names["source"][flagged] = named_rows(folder, flagged.nonzero()[0])
    for column, values in names.items():  # a byte an item: most rows name nothing
        table[column] = values.astype("category")
    return table


def _clear_docs(docs: Path) -> None:
    """Remove a previous Data Docs build so the site shows this run only."""
    if docs.exists():
        if any(docs.iterdir()) and not (docs / "index.html").is_file():
            raise StageError(f"{docs}: exists and is not a Data Docs folder (no index.html); "
                             "refusing to overwrite it")
        shutil.rmtree(docs)


class Suites:
    """The run's Great Expectations suites, one per table, each validating its batches (a table
    can have several: a shard file each) into one Outcome per expectation."""

    def __init__(self, docs: Path, folder: Path, by_key: dict[str, Check], data: Data) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        from pipeline.core import data_docs

        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        _clear_docs(docs)
        self.context.add_data_docs_site(site_name=DOCS_SITE,
                                        site_config=data_docs.site_config(docs))
        self.run_id = data_docs.run_id(data_hash(folder))
        self.docs = docs
        self.by_key, self.data = by_key, data
        self.suites: dict[str, object] = {}
        self.outcomes: dict[str, Outcome] = {}  # by the expectation's id, in suite order

    def suite(self, table: str):
        """The table's suite (named for it, the items' for the unit: `images`), made at its
        first use with an Outcome per expectation."""
        if table not in self.suites:
            name = self.data.unit if table == "items" else table
            suite = self.context.suites.add(self.gx.ExpectationSuite(name=name))
            for check in self.by_key.values():
                if check.table == table:
                    for expectation in check.expectations(self.gx.expectations, self.data):
                        added = suite.add_expectation(expectation)
                        self.outcomes[added.id] = Outcome(added, check)
            self.suites[table] = suite
        return self.suites[table]

    def validate(self, table: str, frame: pd.DataFrame, keys: list[str],
                 batch: str | None = None) -> None:
        """Run `table`'s suite on `frame`, the batch of a data asset of its own (the suite's
        name, or <name>-`batch` when a table has several: Data Docs shows a page per asset);
        each failed row comes back with its `keys` columns (COMPLETE result format)."""
        suite = self.suite(table)
        name = suite.name
        # A data source per batch, deleted after it: GX's pandas engine keeps every batch it
        # has validated (a shard's table each) for as long as its data source lives.
        source = self.context.data_sources.add_pandas(DATA_SOURCE)
        asset = source.add_dataframe_asset(f"{name}-{batch}" if batch else name)
        definition = self.context.validation_definitions.add(self.gx.ValidationDefinition(
            name=asset.name, data=asset.add_batch_definition_whole_dataframe("all"),
            suite=suite))
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": keys},
            run_id=self.run_id)
        self.context.data_sources.delete(DATA_SOURCE)
        for result in outcome.results:
            self.outcomes[result.expectation_config.id].add(result, frame)

    def build_docs(self) -> None:
        from pipeline.core import data_docs

        data_docs.pin_load_times(self.context)
        self.context.build_data_docs(site_names=[DOCS_SITE])
        data_docs.make_offline(self.docs)


def validate(folder: Path, docs: Path, params: Params, reference: dict | None) -> Validation:
    """Describe every item of the ingested `folder` a shard at a time with the `checks` part of
    data.modality, run the suites, write Data Docs to `docs`.

    `reference` is the champion's data profile (pipeline/core/drift.py), None when there is none:
    then drift is not checked.
    """
    modality = params.data.modality
    checks = part(modality, "checks")
    classes = classes_of(folder)  # names a missing manifest
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise StageError(f"{folder / MANIFEST}: expected a list of class names under 'classes'")
    # Image profiles name no modality: they predate data.modality.
    trained_on = None if reference is None else reference.get("modality", "image")
    if trained_on not in (None, modality):
        raise StageError(f"the champion of this task (package.model_name and class list) was "
                         f"trained on {trained_on} data, this data set is {modality}: give it "
                         "another package.model_name")
    unit = preprocessing(modality).UNIT
    data = Data(params, unit, classes, checks.SAME)
    suites = Suites(docs, folder, registered(checks, data), data)
    suites.suite("items")  # its expectations count as passed when there is no shard
    kept_rows, extras = [], []
    for split in SPLITS:
        for shard in shard_files(folder, split):
            table, extra = checks.shard_table(shard, params)
            suites.validate("items", table, ["path"], batch=f"{split}-{shard.stem}")
            kept_rows.append(kept(table, checks))
            extras.append(extra)
    if not kept_rows:  # no item at all: the data-set checks say so
        table, extra = checks.shard_table(None, params)
        kept_rows.append(kept(table, checks))
    table = data_set_table(folder, kept_rows, checks)
    current, report = checks.conclude(table, extras, params, reference)
    class_table, class_counts = class_tables(table, classes, unit)
    suites.validate("data_set", table, ["path"])
    suites.validate("classes", class_table, ["label"])
    suites.validate("class_counts", class_counts, ["split", "label"])
    if report is not None:
        suites.validate("drift", report.table(), ["feature"])
    suites.build_docs()

    outcomes = list(suites.outcomes.values())
    fatal = [o for o in outcomes if o.expectation.meta["fatal"]]
    failed = [o for o in fatal if not o.success]
    drift_failed = any(o.check.table == "drift" for o in failed)
    # A failed drift check already names the feature; its warning would say it twice.
    warned = [] if drift_failed else \
        [o for o in outcomes if not o.expectation.meta["fatal"] and not o.success]
    shared = {
        "classes": len(classes),
        "splits": {s: int((table.split == s).sum()) for s in SPLITS},
        "checks_passed": len(fatal) - len(failed),
        "checks_failed": len(failed),
        "problems": _problem_counts(fatal),
        "drift": report.metrics(warned=bool(warned), failed=drift_failed)
        if report is not None else {"status": "skipped"},
        "success": not failed,
    }
    every = {**checks.metrics(table, params), **shared}
    return Validation(success=not failed, metrics={key: every[key] for key in checks.METRICS},
                      failures=_lines(failed), warnings=_lines(warned), table=table,
                      profile=current)


def _problem_counts(outcomes: list[Outcome]) -> dict[str, int]:
    """Offenders per kind, 0 for a passed check (a table-level failure counts 1)."""
    counts: dict[str, int] = {}
    for o in outcomes:
        key = o.expectation.meta["key"]
        counts[key] = max(counts.get(key, 0), 0 if o.success else (o.count or 1))
    return counts


def _lines(outcomes: list[Outcome]) -> list[str]:
    """Failure lines grouped by kind (drift's PSI and KS lines sit together), suite order."""
    lines: dict[str, list[str]] = {}
    for o in outcomes:
        lines.setdefault(o.expectation.meta["kind"], []).append(o.line)
    return [line for group in lines.values() for line in group]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages validate")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (manifest.json and shards)")
    parser.add_argument("--metrics", type=Path, required=True,
                        help="metrics JSON to write: the counts a person compares across runs")
    parser.add_argument("--details", type=Path, required=True,
                        help="JSON to write: problems per kind, file problems, drift per feature")
    parser.add_argument("--docs", type=Path, required=True, help="Data Docs folder to write")
    parser.add_argument("--profile", type=Path, required=True,
                        help="data profile JSON to write (package stores it with the model)")
    parser.add_argument("--champion", type=Path, required=True,
                        help="the champion record (pipeline/lifecycle/champion.py): drift is checked "
                             "against the champion of this task it names")
    parser.add_argument("--export", type=Path, required=True,
                        help="the exported Bentos the record names (the champion's data profile)")
    args = parser.parse_args(argv)
    p = load_params()
    checks = part(p.data.modality, "checks")
    try:
        classes = classes_of(args.data)
    except StageError:
        classes = []  # validate() below names the missing manifest
    task = Task(model_name=p.package.model_name, classes=classes)
    champion = reference(args.champion, Exports(args.export), task)
    if champion.profile is None:
        print(f"validate: drift not checked: {champion.note}")
    result = validate(args.data, args.docs, p, champion.profile)
    m = result.metrics
    if champion.profile is not None:
        m["drift"]["champion"] = champion.model_tag
    else:
        m["drift"]["reason"] = champion.note  # the run summary says why
    for path, data in ((args.metrics, {k: m[k] for k in checks.SUMMARY}), (args.details, m)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    args.profile.write_text(json.dumps(result.profile, ensure_ascii=False) + "\n", encoding="utf-8")
    unit = preprocessing(p.data.modality).UNIT
    print(f"validate: {m[unit]} {unit}, {m['classes']} classes, {m['splits']}: "
          f"{m['checks_passed']} checks passed, {m['checks_failed']} failed; "
          f"Data Docs in {args.docs / 'index.html'}")
    for line in checks.lines(m, p):
        print(f"validate: {line}")
    if champion.profile is not None:
        scores = [f"{f} PSI {v['psi']:.3f}" + (f" KS {v['ks']:.3f}" if v["ks"] is not None else "")
                  for f, v in m["drift"]["features"].items()]
        print(f"validate: drift against {champion.model_tag}: {m['drift']['status']}; {', '.join(scores)}")
        for note in m["drift"].get("notes", []):  # what the modality shows beside PSI and KS
            print(f"validate: {note}")
    for line in result.warnings:
        print(f"validate: warning: {line}")
    if not result.success:
        raise StageError(f"{args.data}: {m['checks_failed']} data checks failed "
                         f"(details in {args.docs / 'index.html'}):\n  " + "\n  ".join(result.failures))
