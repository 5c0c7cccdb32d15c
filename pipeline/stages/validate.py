"""Stage 2: describe every ingested item and check the data set with Great Expectations suites.

Tables validated, all in an in-memory (ephemeral) GX context:
    <unit>         one row per ingested item, from the modality's `checks` part
                   (pipeline/<data.modality>/checks.py, named for its unit: `images`, `texts`):
                   path, source, label, split, file_problem (why the file is unusable: the kind)
                   and decode_error (in detail), content_hash with the flags leak and duplicate,
                   and what the modality measures besides
    classes        one row per class of manifest.json: <unit> (all splits)
    class_counts   one row per (split, class) of every class that has items: <unit> (0 included)
    drift          one row per feature compared with the reference of the task's champion
                   (pipeline/core/drift.py, pipeline/lifecycle/champion.py): same model name and class list

The checks are registry entries (pipeline/core/checks.py): those every modality shares (row
count, manifest rows, labels, splits, leaks, duplicates, classes, PSI/KS drift) and the part's
CHECKS. The part gives the item table, its checks, the data profile and drift features, the
metrics it adds and what more to print; this stage runs the checks and reports.

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
from pipeline.core.checks import CHECKS, Check, Data
from pipeline.core.dataset import MANIFEST, SPLITS, classes_of, data_hash
from pipeline.core.modality import part, preprocessing
from pipeline.params import Params, load_params

DOCS_SITE = "kiln"
SHOWN = 3  # offenders named per failed kind; the count covers the rest


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


def registered(checks: ModuleType, data: Data) -> dict[str, Check]:
    """Every check of a run, the shared ones (pipeline/core/checks.py) first, by its key."""
    every = {}
    for check in (*CHECKS, *checks.CHECKS):
        key = check.key.format(unit=data.unit, one=data.one)
        if key in every:
            raise ValueError(f"check key {key!r} is registered twice")
        every[key] = check
    return every


def _offenders(result, table: pd.DataFrame, check: Check) -> tuple[int | None, list[str]]:
    """(count, descriptions) of what broke one failed expectation; no count for table checks."""
    res = result.result
    count = len(res["unexpected_index_list"]) if "unexpected_index_list" in res else None
    return count, check.name(res, table, result.expectation_config.kwargs.get("column"))


def failure_line(result, table: pd.DataFrame, check: Check) -> str:
    """'<kind>: <rule> -- <n> break it: a; b; c (+k more)'."""
    config = result.expectation_config
    n, offenders = _offenders(result, table, check)
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


def _problem_counts(results, table: pd.DataFrame, checks: dict[str, Check]) -> dict[str, int]:
    """Offenders per kind, 0 for a passed check (a table-level failure counts 1)."""
    counts: dict[str, int] = {}
    for r in results:
        key = r.expectation_config.meta["key"]
        n = 0 if r.success else (_offenders(r, table, checks[key])[0] or 1)
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
    classes = classes_of(folder)  # names a missing manifest
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise StageError(f"{folder / MANIFEST}: expected a list of class names under 'classes'")
    # Image profiles name no modality: they predate data.modality.
    trained_on = None if reference is None else reference.get("modality", "image")
    if trained_on not in (None, modality):
        raise StageError(f"the champion of this task (package.model_name and class list) was "
                         f"trained on {trained_on} data, this data set is {modality}: give it "
                         "another package.model_name")
    table, current, report = checks.examine(folder, params, reference)
    unit = preprocessing(modality).UNIT
    class_table, class_counts = class_tables(table, classes, unit)
    data = Data(params, unit, classes, checks.SAME)
    by_key = registered(checks, data)

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from pipeline.core import data_docs

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _clear_docs(docs)
    context.add_data_docs_site(site_name=DOCS_SITE, site_config=data_docs.site_config(docs))
    run_id = data_docs.run_id(data_hash(folder))
    source = context.data_sources.add_pandas("kiln")
    # table -> (the GX asset and suite's name, its rows, the columns that name a failed row)
    tables = {"items": (unit, table, ["path"]), "classes": ("classes", class_table, ["label"]),
              "class_counts": ("class_counts", class_counts, ["split", "label"])}
    if report is not None:
        tables["drift"] = ("drift", report.table(), ["feature"])
    results = []
    E = gx.expectations
    for table_name, (name, frame, keys) in tables.items():
        expectations = [e for check in by_key.values() if check.table == table_name
                        for e in check.expectations(E, data)]
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
    drift_failed = any(by_key[r.expectation_config.meta["key"]].table == "drift" for r in failed)
    # A failed drift check already names the feature; its warning would say it twice.
    warned = [] if drift_failed else \
        [r for r in results if not r.expectation_config.meta["fatal"] and not r.success]
    shared = {
        "classes": len(classes),
        "splits": {s: int((table.split == s).sum()) for s in SPLITS},
        "checks_passed": len(fatal) - len(failed),
        "checks_failed": len(failed),
        "problems": _problem_counts(fatal, table, by_key),
        "drift": report.metrics(warned=bool(warned), failed=drift_failed)
        if report is not None else {"status": "skipped"},
        "success": not failed,
    }
    every = {**checks.metrics(table, params), **shared}
    return Validation(success=not failed, metrics={key: every[key] for key in checks.METRICS},
                      failures=_lines(failed, table, by_key),
                      warnings=_lines(warned, table, by_key), table=table, profile=current)


def _lines(results, table: pd.DataFrame, checks: dict[str, Check]) -> list[str]:
    """Failure lines grouped by kind (drift's PSI and KS lines sit together), suite order."""
    lines: dict[str, list[str]] = {}
    for r in results:
        meta = r.expectation_config.meta
        lines.setdefault(meta["kind"], []).append(failure_line(r, table, checks[meta["key"]]))
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
