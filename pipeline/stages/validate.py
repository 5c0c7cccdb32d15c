"""Stage 2: describe every ingested item and check the data set with Great Expectations suites.

Tables validated, all in an in-memory (ephemeral) GX context:
    <unit>         one row per manifest entry, from the modality's `checks` part
                   (pipeline/<data.modality>/checks.py, named for its unit: `images`, `texts`):
                   path, source, label, split, file_problem (why the file is unusable: the kind)
                   and decode_error (in detail), content_hash with the flags leak and duplicate,
                   and what the modality measures besides
    classes        one row per class of classes.json: <unit> (all splits)
    class_counts   one row per (split, class) of every class that has items: <unit> (0 included)
    drift          one row per feature compared with the reference of the task's champion
                   (pipeline/core/drift.py, pipeline/lifecycle/champion.py): same model name and class list

The part gives the item table, its expectations, the data profile and drift features, the
metrics it adds, how its offenders are named and what more to print; this stage adds the checks
every modality shares (manifest rows, labels, splits, classes, PSI/KS drift) and the reporting.

Each expectation carries a `kind` (meta): the problem in plain words, which starts its line in
the error message, and a key under `problems` in the details JSON (offender counts, 0 when
clean). The metrics JSON holds the counts a person compares across runs (the part's SUMMARY:
items, splits, checks passed and failed). Both, the Data Docs site (the same bytes on a rerun
with the same data: pipeline/core/data_docs.py) and the data profile are written even when a check
fails, so the reader can see why; a failure then raises StageError with one line per failed kind
naming a few offending files or classes.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pandas as pd

from pipeline import StageError
from pipeline.lifecycle.champion import Exports, Task, reference
from pipeline.core.dataset import SPLITS, data_hash, read_manifest
from pipeline.core.modality import part, preprocessing
from pipeline.params import DriftParams, Params, load_params

DOCS_SITE = "kiln"
SHOWN = 3  # offenders named per failed kind; the count covers the rest
# Kinds of problem every modality checks: the key (metrics JSON `problems`) and the words that
# start its error line. The part's KINDS add its own (and the class checks' words for its unit).
KINDS = {
    "repeated_rows": "manifest lists a file twice",
    "unknown_labels": "unknown label",
    "unknown_splits": "unknown split",
    "single_class": "single class",
    "drift": "drift from the champion's data",
    "drift_warning": "drift warning",
}


@dataclass(frozen=True)
class Validation:
    success: bool
    metrics: dict
    failures: list[str]   # one line per failed kind, naming offenders
    warnings: list[str]   # drift above the warn thresholds: reported, not fatal
    table: pd.DataFrame   # the per-item table of the modality (images, texts)
    profile: dict         # reference statistics of this data set's train split (pipeline/core/drift.py)


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
    counts = table.groupby(["split", "label"]).size().reindex(grid, fill_value=0)
    return class_table, counts.rename(unit).reset_index()


def _suites(checks: ModuleType, classes: list[str], params: Params, with_drift: bool) -> dict:
    """The expectations of each table; meta.kind names the problem a failure means."""
    import great_expectations as gx
    from great_expectations.expectations.metadata_types import FailureSeverity

    E = gx.expectations
    unit, bounds = preprocessing(params.data.modality).UNIT, params.validate
    count_key = f"{unit[:-1]}_count"  # image_count, text_count, ...
    kinds = {**KINDS, count_key: f"{unit[:-1]} count out of range", **checks.KINDS}

    def kind(key: str, fatal: bool = True) -> dict:
        return {"meta": {"key": key, "kind": kinds[key], "fatal": fatal},
                "severity": FailureSeverity.CRITICAL if fatal else FailureSeverity.WARNING}

    count, repeated, labels, splits = [
        E.ExpectTableRowCountToBeBetween(
            min_value=bounds.min_items, max_value=bounds.max_items, **kind(count_key),
            description=f"The data set holds {bounds.min_items} to {bounds.max_items} {unit} "
                        "(params validate.min_items, validate.max_items)."),
        E.ExpectColumnValuesToBeUnique(
            column="path", **kind("repeated_rows"),
            description="Each manifest row names a different file."),
        E.ExpectColumnValuesToBeInSet(
            column="label", value_set=classes, **kind("unknown_labels"),
            description="Every label is a class of classes.json."),
        E.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), **kind("unknown_splits"),
            description="Every split is train, val or test."),
    ]
    suites = {unit: checks.suite(E, kind, params, count, repeated, labels, splits),
              **_class_suites(E, kind, unit, params.validate.min_items_per_class_per_split)}
    if with_drift:
        suites["drift"] = _drift_suite(E, kind, params.drift) + \
            checks.drift_suite(E, kind, params)
    return suites


def _class_suites(E, kind, unit: str, min_per_split: int) -> dict:
    """The classes and class_counts tables' expectations; `unit` (images, texts) is what they
    count."""
    one = unit[:-1]
    return {
        "classes": [
            E.ExpectTableRowCountToBeBetween(
                min_value=2, **kind("single_class"),
                description="The data set has at least two classes: a classifier needs two."),
            E.ExpectColumnValuesToBeBetween(
                column=unit, min_value=1, **kind("empty_classes"),
                description=f"Every class of classes.json has at least one {one}."),
        ],
        "class_counts": [
            E.ExpectColumnValuesToBeBetween(
                column=unit, min_value=min_per_split, **kind("short_class_splits"),
                description=f"Each class has at least {min_per_split} {unit} in each split "
                            "(params validate.min_items_per_class_per_split)."),
        ],
    }


def _drift_suite(E, kind, drift: DriftParams) -> list:
    return [
        E.ExpectColumnValuesToBeBetween(
            column="psi", max_value=drift.psi_fail, **kind("drift"),
            description=f"Population stability index below {drift.psi_fail} "
                        "(params drift.psi_fail)."),
        E.ExpectColumnValuesToBeBetween(
            column="ks", max_value=drift.ks_fail, **kind("drift"),
            description=f"Kolmogorov-Smirnov distance below {drift.ks_fail} "
                        "(params drift.ks_fail)."),
        E.ExpectColumnValuesToBeBetween(
            column="psi", max_value=drift.psi_warn,
            **kind("drift_warning", fatal=False),
            description=f"Population stability index below {drift.psi_warn} "
                        "(params drift.psi_warn; a warning only)."),
        E.ExpectColumnValuesToBeBetween(
            column="ks", max_value=drift.ks_warn, **kind("drift_warning", fatal=False),
            description=f"Kolmogorov-Smirnov distance below {drift.ks_warn} "
                        "(params drift.ks_warn; a warning only)."),
    ]


def _offenders(result, table: pd.DataFrame, checks: ModuleType) -> tuple[int | None, list[str]]:
    """(count, descriptions) of what broke one failed expectation; no count for table checks.
    Columns only one modality has are named by its part (`checks.offenders`)."""
    kind = result.expectation_config.type
    column = result.expectation_config.kwargs.get("column")
    res = result.result
    if kind == "expect_table_row_count_to_be_between":
        return None, [f"found {res['observed_value']}"]
    rows = res["unexpected_index_list"]
    own = checks.offenders(column, res, table)
    if own is not None:
        return len(rows), own
    source = dict(zip(table.path, table.source))
    if column in ("leak", "duplicate"):
        hashes = table.set_index("path").content_hash
        offenders = table[table.content_hash.isin({hashes[r["path"]] for r in rows})]
        offenders = offenders.sort_values(["split", "source"], key=lambda c: c.map(
            SPLITS.index) if c.name == "split" else c)  # train first: the copy's origin
        groups = offenders.groupby("content_hash", sort=False).apply(
            lambda g: " = ".join(f"{s} ({split})" for s, split in zip(g.source, g.split)),
            include_groups=False)
        return len(rows), list(groups)
    if column == "file_problem":
        errors = table.set_index("path").decode_error
        return len(rows), [f"{r['file_problem']}: {source[r['path']]} ({errors[r['path']]})"
                           for r in rows]
    key = result.expectation_config.meta["key"]
    if key == "short_class_splits":  # class_counts: its count column is named for the unit
        return len(rows), [f"{r['split']}/{r['label']} ({r[column]} {column})" for r in rows]
    if key == "empty_classes":
        return len(rows), [f"class {r['label']!r} ({r[column]} {column})" for r in rows]
    if column in ("psi", "ks"):
        return len(rows), [f"{r['feature']} {column.upper()} {r[column]:.3f}" for r in rows]
    return len(rows), [f"{source.get(r['path'], r['path'])} ({column}={r[column]})" for r in rows]


def failure_line(result, table: pd.DataFrame, checks: ModuleType) -> str:
    """'<kind>: <rule> -- <n> break it: a; b; c (+k more)'."""
    config = result.expectation_config
    n, offenders = _offenders(result, table, checks)
    counted = f"{n} break it: " if n is not None else ""
    line = f"{config.meta['kind']}: {config.description} -- {counted}{'; '.join(offenders[:SHOWN])}"
    return line + (f" (+{len(offenders) - SHOWN} more)" if len(offenders) > SHOWN else "")


def _clear_docs(docs: Path) -> None:
    """Remove a previous Data Docs build so the site shows this run only."""
    if docs.exists():
        if any(docs.iterdir()) and not (docs / "index.html").is_file():
            raise StageError(f"{docs}: exists and is not a Data Docs folder (no index.html); "
                             "refusing to overwrite it")
        shutil.rmtree(docs)


def _problem_counts(results, table: pd.DataFrame, checks: ModuleType) -> dict[str, int]:
    """Offenders per kind, 0 for a passed check (a table-level failure counts 1)."""
    counts: dict[str, int] = {}
    for r in results:
        key = r.expectation_config.meta["key"]
        n = 0 if r.success else (_offenders(r, table, checks)[0] or 1)
        counts[key] = max(counts.get(key, 0), n)
    return counts


def validate(folder: Path, docs: Path, params: Params, reference: dict | None) -> Validation:
    """Describe every item of the ingested `folder` with the `checks` part of data.modality, run
    the suites, write Data Docs to `docs`.

    `reference` is the champion's data profile (pipeline/core/drift.py), None when there is none:
    then drift is not checked.
    """
    modality = params.data.modality
    checks = part(modality, "checks")
    try:
        rows, classes = read_manifest(folder)
    except FileNotFoundError as e:
        raise StageError(f"{e.filename}: not found (run the ingest stage first)") from None
    if rows and not {"path", "label", "split"} <= set(rows[0]):
        raise StageError(f"{folder / 'manifest.csv'}: needs columns path, label, split; "
                         f"has {', '.join(rows[0])}")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise StageError(f"{folder / 'classes.json'}: expected a list of class names")
    # Image profiles name no modality: they predate data.modality.
    trained_on = None if reference is None else reference.get("modality", "image")
    if trained_on not in (None, modality):
        raise StageError(f"the champion of this task (package.model_name and class list) was "
                         f"trained on {trained_on} data, this data set is {modality}: give it "
                         "another package.model_name")
    table, current, report = checks.examine(folder, rows, params, reference)
    unit = preprocessing(modality).UNIT
    class_table, class_counts = class_tables(table, classes, unit)

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from pipeline.core import data_docs

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _clear_docs(docs)
    context.add_data_docs_site(site_name=DOCS_SITE, site_config=data_docs.site_config(docs))
    run_id = data_docs.run_id(data_hash(folder))
    source = context.data_sources.add_pandas("kiln")
    tables = {unit: (table, ["path"]), "classes": (class_table, ["label"]),
              "class_counts": (class_counts, ["split", "label"])}
    if report is not None:
        tables["drift"] = (report.table(), ["feature"])
    results = []
    for name, expectations in _suites(checks, classes, params, report is not None).items():
        frame, keys = tables[name]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # COMPLETE + index columns: each failed row comes back with its path (or split/label).
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": keys}, run_id=run_id)
        results.extend(outcome.results)
    data_docs.pin_load_times(context)
    context.build_data_docs(site_names=[DOCS_SITE])
    data_docs.make_offline(docs)

    fatal = [r for r in results if r.expectation_config.meta["fatal"]]
    failed = [r for r in fatal if not r.success]
    drift_failed = any(r.expectation_config.meta["key"] == "drift" for r in failed)
    # A failed drift check already names the feature; its warning would say it twice.
    warned = [] if drift_failed else \
        [r for r in results if not r.expectation_config.meta["fatal"] and not r.success]
    shared = {
        "classes": len(classes),
        "splits": {s: int((table.split == s).sum()) for s in SPLITS},
        "checks_passed": len(fatal) - len(failed),
        "checks_failed": len(failed),
        "problems": _problem_counts(fatal, table, checks),
        "drift": report.metrics(warned=bool(warned), failed=drift_failed)
        if report is not None else {"status": "skipped"},
        "success": not failed,
    }
    every = {**checks.metrics(table, params), **shared}
    return Validation(success=not failed, metrics={key: every[key] for key in checks.METRICS},
                      failures=_lines(failed, table, checks),
                      warnings=_lines(warned, table, checks), table=table, profile=current)


def _lines(results, table: pd.DataFrame, checks: ModuleType) -> list[str]:
    """Failure lines grouped by kind (drift's PSI and KS lines sit together), suite order."""
    lines: dict[str, list[str]] = {}
    for r in results:
        lines.setdefault(r.expectation_config.meta["kind"], []).append(
            failure_line(r, table, checks))
    return [line for group in lines.values() for line in group]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages validate")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (manifest.csv)")
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
        classes = read_manifest(args.data)[1]
    except FileNotFoundError:
        classes = []  # validate() below names the missing file
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
