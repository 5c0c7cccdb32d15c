"""Stage 2: decode every ingested image and check the data set with Great Expectations suites.

Tables validated, all in an in-memory (ephemeral) GX context:
    images         one row per manifest entry: path, source, label, split, file_problem (why the
                   file is not a usable PNG/JPEG: empty, truncated, corrupt, not an image),
                   mode (PIL's, as decoded), then of the pixels converted to data.channels by
                   pipeline/image/preprocess.py as every later consumer converts them: height, width,
                   channels, pixel_min/max/mean/std, content_hash (sha256 of those pixels, so a
                   copy under another name or re-encoded losslessly collides), and flags derived
                   from those: blank, leak, duplicate, resize_factor
    classes        one row per class of classes.json: images (all splits)
    class_counts   one row per (split, class) of every class that has images: images (0 included)
    drift          one row per feature compared with the reference of the task's champion
                   (pipeline/drift.py, pipeline/champion.py): same model name and class list

With data.modality text, a texts table (pipeline/text/checks.py) takes the images table's place
and the class tables count texts; the rest (reports, exit rules) is the same.

Each expectation carries a `kind` (meta): the problem in plain words, which starts its line in
the error message, and a key under `problems` in the details JSON (offender counts, 0 when
clean). The metrics JSON holds the counts a person compares across runs (SUMMARY: images,
splits, checks passed and failed). Both, the Data Docs site (the same bytes on a rerun with the
same data: pipeline/data_docs.py) and the data profile are written even when a check fails, so
the reader can see why; a failure then raises StageError with one line per failed kind naming a
few offending files or classes. Images of any mode PIL decodes (palette, gray or RGB with alpha,
CMYK, 16-bit) are converted, not refused: the metrics count them per original mode (`converted`).

Decoding and hashing run in a process pool over chunks of files: the parent holds one small dict
per image, never pixels, so memory stays flat however large the data set.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import StageError
from pipeline.champion import Task, reference, write_pointer
from pipeline.dataset import SPLITS, data_hash, read_manifest
from pipeline.drift import compare, profile
from pipeline.params import DataParams, DriftParams, TextParams, ValidateParams, load_params
from pipeline.image.preprocess import IMAGE_FORMATS, MODES, to_channels

DOCS_SITE = "kiln"
SHOWN = 3  # offenders named per failed kind; the count covers the rest
# What --metrics holds (the rest of Validation.metrics goes to --details): the counts a person
# compares across runs with `dvc metrics diff` / `dvc exp show`.
SUMMARY = ("images", "classes", "splits", "undecodable", "converted", "duplicates",
           "checks_passed", "checks_failed", "success")
# Every key of Validation.metrics, in the order the details JSON holds them.
METRICS = ("images", "classes", "splits", "undecodable", "duplicates", "converted",
           "channels_model", "checks_passed", "checks_failed", "problems", "file_problems", "drift",
           "success")
CHUNK = 512  # files per pool task: large enough that task overhead (~0.1 ms) is noise
PNG_MAGIC, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
JPEG_MAGIC, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
FILE_PROBLEMS = ("empty file", "truncated PNG", "truncated JPEG", "corrupt PNG", "corrupt JPEG",
                 "not a PNG/JPEG image", "unreadable file")  # what file_problem() names
COLUMNS = ["path", "source", "label", "split", "file_problem", "decode_error", "mode", "height",
           "width", "channels", "pixel_min", "pixel_max", "pixel_mean", "pixel_std", "content_hash"]

# Kinds of problem: the key (metrics JSON `problems`) and the words that start its error line.
KINDS = {
    "image_count": "image count out of range",
    "repeated_rows": "manifest lists a file twice",
    "unreadable_files": "unreadable image file",
    "unknown_labels": "unknown label",
    "unknown_splits": "unknown split",
    "wrong_size": "image size far from data.image_size",
    "blank_images": "too many blank images",
    "leaked_images": "same image in two splits (leakage)",
    "duplicate_images": "duplicate images in a split",
    "single_class": "single class",
    "empty_classes": "class folder with no images",
    "short_class_splits": "class short of images in a split",
    "drift": "drift from the champion's data",
    "drift_warning": "drift warning",
}


@dataclass(frozen=True)
class Validation:
    success: bool
    metrics: dict
    failures: list[str]   # one line per failed kind, naming offenders
    warnings: list[str]   # drift above the warn thresholds: reported, not fatal
    images: pd.DataFrame  # the per-file table: images, or texts (pipeline/text/checks.py)
    profile: dict         # reference statistics of this data set's train split (pipeline/drift.py)


def file_problem(data: bytes) -> str:
    """Name why `data` did not decode as PNG/JPEG: the kind, for the message and the metrics."""
    if not data:
        return "empty file"
    body = data.rstrip(b"\0\r\n ")  # some tools pad files; padding does not make them whole
    if data.startswith(PNG_MAGIC):
        return "corrupt PNG" if body.endswith(PNG_END) else "truncated PNG"
    if data.startswith(JPEG_MAGIC):
        return "corrupt JPEG" if body.endswith(JPEG_END) else "truncated JPEG"
    return "not a PNG/JPEG image"


def describe_image(path: Path, data_params: DataParams) -> dict:
    """Mode as decoded, then size, channels, pixel statistics and content hash of one file's
    pixels converted to data.channels (over data.background); or, when it is not a usable
    PNG/JPEG, file_problem (the kind) and decode_error (PIL's words)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return {"file_problem": "unreadable file", "decode_error": f"{type(e).__name__}: {e}"}
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            image.load()
            mode = image.mode
            pixels = np.asarray(to_channels(image, data_params.channels, data_params.background))
    # PIL's decoders raise many types for a broken file (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...): any of them means "does not decode".
    except Exception as e:  # noqa: BLE001
        problem = file_problem(data)
        detail = ("0 bytes" if problem == "empty file" else
                  f"{len(data)} bytes starting {data[:12]!r}" if problem.startswith("not a") else
                  f"{type(e).__name__}: {e}")
        return {"file_problem": problem, "decode_error": detail}
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype.str}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    low, high = pixels.min(), pixels.max()
    return {
        "file_problem": None, "decode_error": None, "mode": mode,
        "height": pixels.shape[0], "width": pixels.shape[1],
        "channels": 1 if pixels.ndim == 2 else pixels.shape[2],
        "pixel_min": float(low), "pixel_max": float(high),
        "pixel_mean": float(pixels.mean()),
        # a constant image has std 0 exactly; skip the float pass for it
        "pixel_std": 0.0 if low == high else float(pixels.std()),
        "content_hash": digest.hexdigest(),
    }


def _describe_chunk(paths: list[Path], data_params: DataParams) -> list[dict]:
    return [describe_image(p, data_params) for p in paths]


def pool_size(workers: int) -> int:
    """validate.workers, 0 meaning one process per core this process may run on."""
    return workers or len(os.sched_getaffinity(0))


def image_table(folder: Path, rows: list[dict], workers: int, data_params: DataParams
                ) -> pd.DataFrame:
    """One row per manifest entry with its description, decoded by `workers` processes."""
    paths = [folder / r["path"] for r in rows]
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    describe = functools.partial(_describe_chunk, data_params=data_params)
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            described = [d for chunk in pool.map(describe, chunks) for d in chunk]
    else:
        described = describe(paths)
    records = [{"path": r["path"], "source": r.get("source") or r["path"], "label": r["label"],
                "split": r["split"], **d} for r, d in zip(rows, described)]
    table = pd.DataFrame.from_records(records, columns=COLUMNS)
    # An empty manifest would leave object columns, which pandas treats as column labels.
    return table.astype({"pixel_std": float, "height": float, "width": float})


def add_flags(images: pd.DataFrame, image_size: int) -> pd.DataFrame:
    """Columns the suites check that need more than one row or a param: blank, leak, duplicate,
    resize_factor. Files that do not decode get False / NaN, and blank images are left out of
    leak and duplicate (all-black images are identical by nature): each problem is reported once,
    by its own check."""
    decoded = images.content_hash.notna()
    blank = decoded & (images.pixel_std == 0)
    distinct = images[decoded & ~blank]
    splits_per_hash = distinct.groupby("content_hash").split.nunique()
    copies_in_split = distinct.groupby(["split", "content_hash"]).path.transform("size")
    side = images[["height", "width"]]
    factor = np.maximum(side.max(axis=1) / image_size, image_size / side.min(axis=1))
    return images.assign(
        blank=blank,
        leak=images.content_hash.map(splits_per_hash).fillna(0).where(~blank, 0) > 1,
        duplicate=(copies_in_split.reindex(images.index).fillna(0) > 1),
        resize_factor=factor.round(3),
    )


def class_tables(images: pd.DataFrame, classes: list[str], unit: str = "images"
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(classes: label, <unit>) and (class_counts: split, label, <unit>) with zeros included for
    every class that has files somewhere; an empty class is the classes table's finding. `unit`
    names the count column: images, or texts."""
    per_class = images.label.value_counts()
    class_table = pd.DataFrame({"label": classes,
                                unit: [int(per_class.get(c, 0)) for c in classes]})
    present = [c for c in classes if per_class.get(c, 0) > 0]
    grid = pd.MultiIndex.from_product([list(SPLITS), present], names=["split", "label"])
    counts = images.groupby(["split", "label"]).size().reindex(grid, fill_value=0)
    return class_table, counts.rename(unit).reset_index()


def _suites(classes: list[str], data: DataParams, rules: ValidateParams, drift: DriftParams | None,
            text: TextParams | None = None):
    """The expectations of each table; meta.kind names the problem a failure means. `text`:
    the text modality's (pipeline/text/checks.py) in the images table's place."""
    import great_expectations as gx
    from great_expectations.expectations.metadata_types import FailureSeverity

    E = gx.expectations
    kinds = KINDS
    if text is not None:
        from pipeline.text import checks
        kinds = {**KINDS, **checks.KINDS}

    def kind(key: str, fatal: bool = True) -> dict:
        return {"meta": {"key": key, "kind": kinds[key], "fatal": fatal},
                "severity": FailureSeverity.CRITICAL if fatal else FailureSeverity.WARNING}

    repeated, labels, splits = [
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
    if text is not None:
        suites = {"texts": checks.suites(E, kind, text, repeated, labels, splits),
                  **_class_suites(E, kind, "texts", text.min_texts_per_class_per_split,
                                  "text.min_texts_per_class_per_split")}
        if drift is not None:
            suites["drift"] = _drift_suite(E, kind, drift) + checks.drift_suite(E, kind, text)
        return suites

    if data.allow_resize:
        size_rule = (f"Every image side is within {rules.max_resize_factor:g}x of data.image_size "
                     f"{data.image_size} px, smaller or larger "
                     "(params validate.max_resize_factor).")
        max_factor = rules.max_resize_factor
    else:
        size_rule = (f"Every image is already {data.image_size}x{data.image_size} px "
                     "(params data.allow_resize is false).")
        max_factor = 1.0
    images = [
        E.ExpectTableRowCountToBeBetween(
            min_value=rules.min_images, max_value=rules.max_images, **kind("image_count"),
            description=f"The data set holds {rules.min_images} to {rules.max_images} images "
                        "(params validate.min_images, validate.max_images)."),
        repeated,
        E.ExpectColumnValuesToBeNull(
            column="file_problem", **kind("unreadable_files"),
            description="Every file is a complete PNG or JPEG image that decodes: not empty, "
                        "not truncated, not corrupt, not another kind of file."),
        labels,
        splits,
        E.ExpectColumnValuesToBeBetween(
            column="resize_factor", min_value=1.0, max_value=max_factor,
            **kind("wrong_size"), description=size_rule),
        # mostly: GX passes while at least this share of rows is not blank.
        E.ExpectColumnValuesToBeInSet(
            column="blank", value_set=[False], mostly=1 - rules.max_blank_fraction,
            **kind("blank_images"),
            description=f"At most {rules.max_blank_fraction:.1%} of the images are blank (one "
                        "value in every pixel) (params validate.max_blank_fraction)."),
        E.ExpectColumnValuesToBeInSet(
            column="leak", value_set=[False], **kind("leaked_images"),
            description="No image's pixels appear in more than one split: a copy of a training "
                        "image in val or test inflates the measured accuracy."),
        E.ExpectColumnValuesToBeInSet(
            column="duplicate", value_set=[False], **kind("duplicate_images"),
            description="No two images of one split have the same pixels."),
    ]
    suites = {"images": images, **_class_suites(E, kind, "images",
                                                rules.min_images_per_class_per_split,
                                                "validate.min_images_per_class_per_split")}
    if drift is not None:
        suites["drift"] = _drift_suite(E, kind, drift)
    return suites


def _class_suites(E, kind, unit: str, min_per_split: int, key: str) -> dict:
    """The classes and class_counts tables' expectations; `unit` (images, texts) is what they
    count, `key` the params key of the per-split minimum."""
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
                            f"(params {key})."),
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


def _offenders(result, images: pd.DataFrame) -> tuple[int | None, list[str]]:
    """(count, descriptions) of what broke one failed expectation; no count for table checks."""
    kind = result.expectation_config.type
    kwargs = result.expectation_config.kwargs
    column = kwargs.get("column")
    res = result.result
    source = dict(zip(images.path, images.source))
    if kind == "expect_table_row_count_to_be_between":
        return None, [f"found {res['observed_value']}"]
    rows = res["unexpected_index_list"]
    if column in ("leak", "duplicate"):
        hashes = images.set_index("path").content_hash
        offenders = images[images.content_hash.isin({hashes[r["path"]] for r in rows})]
        offenders = offenders.sort_values(["split", "source"], key=lambda c: c.map(
            SPLITS.index) if c.name == "split" else c)  # train first: the copy's origin
        groups = offenders.groupby("content_hash", sort=False).apply(
            lambda g: " = ".join(f"{s} ({split})" for s, split in zip(g.source, g.split)),
            include_groups=False)
        return len(rows), list(groups)
    if column == "file_problem":
        errors = images.set_index("path").decode_error
        return len(rows), [f"{r['file_problem']}: {source[r['path']]} ({errors[r['path']]})"
                           for r in rows]
    if column == "resize_factor":
        sizes = images.set_index("path")
        return len(rows), [f"{source[r['path']]} ({int(sizes.width[r['path']])}x"
                           f"{int(sizes.height[r['path']])} px)" for r in rows]
    if column == "blank":
        return len(rows), [f"{res['unexpected_percent']:.1f}% blank"] + \
            [source[r["path"]] for r in rows]
    if column in ("images", "texts") and rows and "split" in rows[0]:  # class_counts, by split
        return len(rows), [f"{r['split']}/{r['label']} ({r[column]} {column})" for r in rows]
    if column in ("images", "texts"):
        return len(rows), [f"class {r['label']!r} ({r[column]} {column})" for r in rows]
    if column in ("psi", "ks"):
        return len(rows), [f"{r['feature']} {column.upper()} {r[column]:.3f}" for r in rows]
    if column == "oov_rise":
        return len(rows), [f"out-of-vocabulary share up {r[column]:.3f}" for r in rows]
    if column in ("empty", "words"):
        from pipeline.text import checks
        return len(rows), checks.offenders(column, rows, images)
    return len(rows), [f"{source.get(r['path'], r['path'])} ({column}={r[column]})" for r in rows]


def failure_line(result, images: pd.DataFrame) -> str:
    """'<kind>: <rule> -- <n> break it: a; b; c (+k more)'."""
    config = result.expectation_config
    n, offenders = _offenders(result, images)
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


def _problem_counts(results, images: pd.DataFrame) -> dict[str, int]:
    """Offenders per kind, 0 for a passed check (a table-level failure counts 1)."""
    counts: dict[str, int] = {}
    for r in results:
        key = r.expectation_config.meta["key"]
        n = 0 if r.success else (_offenders(r, images)[0] or 1)
        counts[key] = max(counts.get(key, 0), n)
    return counts


def validate(folder: Path, docs: Path, *, data: DataParams, rules: ValidateParams,
             drift: DriftParams, reference: dict | None, text: TextParams | None = None
             ) -> Validation:
    """Decode every image (or with data.modality text, every text: `text` holds its params) of
    the ingested `folder`, run the suites, write Data Docs to `docs`.

    `reference` is the champion's data profile (pipeline/drift.py), None when there is none:
    then drift is not checked.
    """
    try:
        rows, classes = read_manifest(folder)
    except FileNotFoundError as e:
        raise StageError(f"{e.filename}: not found (run the ingest stage first)") from None
    if rows and not {"path", "label", "split"} <= set(rows[0]):
        raise StageError(f"{folder / 'manifest.csv'}: needs columns path, label, split; "
                         f"has {', '.join(rows[0])}")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise StageError(f"{folder / 'classes.json'}: expected a list of class names")
    if reference is not None and reference.get("modality", "image") != data.modality:
        raise StageError(f"the champion of this task (package.model_name and class list) was "
                         f"trained on {reference.get('modality', 'image')} data, this data set is "
                         f"{data.modality}: give it another package.model_name")
    if data.modality == "text":
        from pipeline.text import checks
        unit = "texts"
        images, train_words = checks.text_table(folder, rows)
        current = checks.profile(images, train_words, text.profile_words)
        report = checks.compare_texts(reference, current, train_words, drift) \
            if reference is not None else None
    else:
        unit = "images"
        images = add_flags(image_table(folder, rows, pool_size(rules.workers), data),
                           data.image_size)
        current = profile(images[images.split == "train"])
        report = compare(reference, current, drift) if reference is not None else None
    class_table, class_counts = class_tables(images, classes, unit)

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from pipeline import data_docs

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _clear_docs(docs)
    context.add_data_docs_site(site_name=DOCS_SITE, site_config=data_docs.site_config(docs))
    run_id = data_docs.run_id(data_hash(folder))
    source = context.data_sources.add_pandas("kiln")
    tables = {unit: (images, ["path"]), "classes": (class_table, ["label"]),
              "class_counts": (class_counts, ["split", "label"])}
    if report is not None:
        tables["drift"] = (report.table(), ["feature"])
    results = []
    suites = _suites(classes, data, rules, drift if report is not None else None,
                     text if unit == "texts" else None)
    for name, expectations in suites.items():
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
        "splits": {s: int((images.split == s).sum()) for s in SPLITS},
        "checks_passed": len(fatal) - len(failed),
        "checks_failed": len(failed),
        "problems": _problem_counts(fatal, images),
        "drift": report.metrics(warned=bool(warned), failed=drift_failed)
        if report is not None else {"status": "skipped"},
        "success": not failed,
    }
    if unit == "texts":
        specific, order = checks.metrics(images), checks.METRICS
    else:
        decoded = images[images.file_problem.isna()]
        specific, order = {
            "images": len(images),
            "undecodable": int(images.file_problem.notna().sum()),
            "duplicates": int(decoded.content_hash.duplicated().sum()),
            # original mode -> images converted from it to data.channels (its PIL mode)
            "converted": {str(m): int(n) for m, n in
                          decoded["mode"][decoded["mode"] != MODES[data.channels]].value_counts()
                          .sort_index().items()},
            "channels_model": data.channels,
            "file_problems": {p.replace(" ", "_").replace("/", "_"):
                              int((images.file_problem == p).sum()) for p in FILE_PROBLEMS},
        }, METRICS
    metrics = {key: {**specific, **shared}[key] for key in order}
    return Validation(success=not failed, metrics=metrics,
                      failures=_lines(failed, images), warnings=_lines(warned, images),
                      images=images, profile=current)


def _lines(results, images: pd.DataFrame) -> list[str]:
    """Failure lines grouped by kind (drift's PSI and KS lines sit together), suite order."""
    lines: dict[str, list[str]] = {}
    for r in results:
        lines.setdefault(r.expectation_config.meta["kind"], []).append(failure_line(r, images))
    return [line for group in lines.values() for line in group]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline validate")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (manifest.csv)")
    parser.add_argument("--metrics", type=Path, required=True,
                        help="metrics JSON to write: the counts a person compares across runs")
    parser.add_argument("--details", type=Path, required=True,
                        help="JSON to write: problems per kind, file problems, drift per feature")
    parser.add_argument("--docs", type=Path, required=True, help="Data Docs folder to write")
    parser.add_argument("--profile", type=Path, required=True,
                        help="data profile JSON to write (package stores it with the model)")
    parser.add_argument("--champion", type=Path,
                        help="the champion pointer to write (pipeline/champion.py): the champion "
                             "drift is checked against; dvc.yaml makes it a dep of this stage")
    args = parser.parse_args(argv)
    p = load_params()
    try:
        classes = read_manifest(args.data)[1]
    except FileNotFoundError:
        classes = []  # validate() below names the missing file
    task = Task(model_name=p.package.model_name, classes=classes)
    if args.champion:
        write_pointer(args.champion, task)
    champion = reference(task)
    if champion.profile is None:
        print(f"validate: drift not checked: {champion.note}")
    result = validate(args.data, args.docs, data=p.data, rules=p.validate, drift=p.drift,
                      reference=champion.profile, text=p.text)
    m = result.metrics
    if champion.profile is not None:
        m["drift"]["champion"] = champion.model_tag
    unit = "texts" if p.data.modality == "text" else "images"
    summary = SUMMARY
    if unit == "texts":
        from pipeline.text.checks import SUMMARY as summary
    for path, data in ((args.metrics, {k: m[k] for k in summary}), (args.details, m)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    args.profile.write_text(json.dumps(result.profile, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"validate: {m[unit]} {unit}, {m['classes']} classes, {m['splits']}: "
          f"{m['checks_passed']} checks passed, {m['checks_failed']} failed; "
          f"Data Docs in {args.docs / 'index.html'}")
    if m.get("converted"):
        print(f"validate: {sum(m['converted'].values())} images converted to "
              f"{MODES[p.data.channels]} (data.channels {p.data.channels}), by original mode: "
              + ", ".join(f"{mode} {n}" for mode, n in m["converted"].items()))
    if champion.profile is not None:
        scores = [f"{f} PSI {v['psi']:.3f}" + (f" KS {v['ks']:.3f}" if v["ks"] is not None else "")
                  for f, v in m["drift"]["features"].items()]
        if "oov" in m["drift"]:
            scores.append(f"out of vocabulary {m['drift']['oov']['rate']:.1%} (champion's own "
                          f"{m['drift']['oov']['champion_rate']:.1%})")
        print(f"validate: drift against {champion.model_tag}: {m['drift']['status']}; {', '.join(scores)}")
    for line in result.warnings:
        print(f"validate: warning: {line}")
    if not result.success:
        raise StageError(f"{args.data}: {m['checks_failed']} data checks failed "
                         f"(details in {args.docs / 'index.html'}):\n  " + "\n  ".join(result.failures))
