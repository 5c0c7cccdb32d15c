"""Stage 2: decode every ingested image and check the data set with a Great Expectations suite.

Two tables are validated, both in an in-memory (ephemeral) GX context:
    images         one row per manifest entry: path, label, split, decodes, decode_error, height,
                   width, channels, pixel_min/max/mean/std, content_hash (sha256 of the decoded
                   pixels, so a copy under another name or re-encoded losslessly collides)
    class_counts   one row per (split, label) present: images

The metrics JSON and the Data Docs site are written even when a check fails, so the reader can
see why; a failure then raises StageError naming each failed expectation and a few offenders.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import StageError
from pipeline.ingest import SPLITS, read_manifest
from pipeline.params import load_params

DOCS_SITE = "kiln"
SHOWN = 3  # offenders named per failed expectation; the count covers the rest


@dataclass(frozen=True)
class Validation:
    success: bool
    metrics: dict
    failures: list[str]   # one line per failed expectation, naming offenders
    images: pd.DataFrame


def describe_image(path: Path) -> dict:
    """Decoded size, channels, pixel statistics and content hash of one file; decodes=False if not."""
    try:
        with Image.open(path) as image:
            image.load()
            # Palette and bilevel files hold 8-bit pixels behind an indirection: describe the
            # values preprocessing will see. 16-bit and float modes stay as they are, so the
            # [0, 255] check sees them.
            if image.mode in ("P", "PA"):
                alpha = image.mode == "PA" or "transparency" in image.info
                image = image.convert("RGBA" if alpha else "RGB")
            elif image.mode == "1":
                image = image.convert("L")
            pixels = np.asarray(image)
    # PIL's decoders raise many types for a broken file (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...): any of them means "does not decode".
    except Exception as e:  # noqa: BLE001
        return {"decodes": False, "decode_error": f"{type(e).__name__}: {e}"}
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype.str}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return {
        "decodes": True, "decode_error": None,
        "height": pixels.shape[0], "width": pixels.shape[1],
        "channels": 1 if pixels.ndim == 2 else pixels.shape[2],
        "pixel_min": float(pixels.min()), "pixel_max": float(pixels.max()),
        "pixel_mean": float(pixels.mean()), "pixel_std": float(pixels.std()),
        "content_hash": digest.hexdigest(),
    }


def image_table(folder: Path, rows: list[dict]) -> pd.DataFrame:
    columns = ["path", "label", "split", "decodes", "decode_error", "height", "width", "channels",
               "pixel_min", "pixel_max", "pixel_mean", "pixel_std", "content_hash"]
    records = [{"path": r["path"], "label": r["label"], "split": r["split"],
                **describe_image(folder / r["path"])} for r in rows]
    table = pd.DataFrame.from_records(records, columns=columns)
    # An empty manifest would leave an object column, which pandas treats as column labels.
    return table.astype({"decodes": bool})


def class_count_table(images: pd.DataFrame) -> pd.DataFrame:
    return images.groupby(["split", "label"]).size().rename("images").reset_index()


def _suites(classes: list[str], min_images: int, max_images: int,
            min_images_per_class_per_split: int):
    """The expectations on the images table and on the class_counts table."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    images = [
        E.ExpectTableRowCountToBeBetween(
            min_value=min_images, max_value=max_images,
            description=f"The data set holds {min_images} to {max_images} images "
                        "(params validate.min_images, validate.max_images)."),
        E.ExpectColumnValuesToBeUnique(
            column="path", description="Each manifest row names a different file."),
        E.ExpectColumnValuesToBeInSet(
            column="decodes", value_set=[True], description="Every file decodes as an image."),
        E.ExpectColumnValuesToBeInSet(
            column="label", value_set=classes, description="Every label is a class of classes.json."),
        E.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), description="Every split is train, val or test."),
        # ...ToContainSet, not ...ToEqualSet: unknown labels are the set check's job above, and
        # GX 1.24's Data Docs renderer crashes on an ...ToEqualSet result with unknown values.
        *[E.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=classes, row_condition=Column("split") == split,
            description=f"Every class of classes.json has images in {split}.")
          for split in SPLITS],
        # Preprocessing converts every image to data.channels later; a mix of channel counts
        # in one data set is still a sign that files from different sources were merged.
        E.ExpectColumnUniqueValueCountToBeBetween(
            column="channels", min_value=1, max_value=1,
            description="All images have the same number of channels."),
        E.ExpectColumnValuesToBeBetween(
            column="pixel_min", min_value=0, max_value=255,
            description="Pixel values are 8-bit: the darkest pixel is in [0, 255]."),
        E.ExpectColumnValuesToBeBetween(
            column="pixel_max", min_value=0, max_value=255,
            description="Pixel values are 8-bit: the brightest pixel is in [0, 255]."),
        E.ExpectColumnValuesToBeUnique(
            column="content_hash",
            description="No two images have the same pixels: a repeat is a duplicate, "
                        "or a leak between splits when the copies sit in different splits."),
    ]
    class_counts = [
        E.ExpectColumnValuesToBeBetween(
            column="images", min_value=min_images_per_class_per_split,
            description=f"Each class has at least {min_images_per_class_per_split} images in each "
                        "split where it appears (params validate.min_images_per_class_per_split)."),
    ]
    return {"images": images, "class_counts": class_counts}


def _offenders(result, images: pd.DataFrame) -> tuple[int | None, list[str]]:
    """(count, descriptions) of what broke one failed expectation; no count for table checks."""
    kind = result.expectation_config.type
    kwargs = result.expectation_config.kwargs
    column = kwargs.get("column")
    res = result.result
    if kind == "expect_table_row_count_to_be_between":
        return None, [f"found {res['observed_value']} images"]
    if kind == "expect_column_distinct_values_to_contain_set":
        split = kwargs["row_condition"]["parameter"]
        return res["missing_count"], [f"{split} lacks class {c}" for c in res["partial_missing_list"]]
    if kind == "expect_column_unique_value_count_to_be_between":
        decoded = images[images.decodes]
        counts = decoded[column].value_counts()
        if counts.empty:
            return None, ["no image decodes"]
        usual = counts.index[0]
        odd = decoded[decoded[column] != usual]
        mix = ", ".join(f"{int(v)}: {n} images" for v, n in counts.items())
        return len(odd), [f"{counts.size} values ({mix})"] + \
            [f"{p} ({int(v)} {column})" for p, v in zip(odd.path, odd[column])]
    rows = res["unexpected_index_list"]
    if column == "content_hash":
        groups = images[images.content_hash.isin({r["content_hash"] for r in rows})] \
            .groupby("content_hash", sort=False).path.apply(list)
        return len(rows), [" = ".join(paths) for paths in groups]
    if column == "images":
        return len(rows), [f"{r['split']}/{r['label']} ({r['images']} images)" for r in rows]
    if column == "decodes":
        errors = images.set_index("path").decode_error
        return len(rows), [f"{r['path']} ({errors[r['path']]})" for r in rows]
    return len(rows), [f"{r['path']} ({column}={r[column]})" for r in rows]


def failure_line(result, images: pd.DataFrame) -> str:
    """'<expectation>(<column>): <rule> -- <n> break it: a; b; c (+k more)'."""
    config = result.expectation_config
    column = config.kwargs.get("column")
    n, offenders = _offenders(result, images)
    name = f"{config.type}({column})" if column else config.type
    counted = f"{n} break it: " if n is not None else ""
    line = f"{name}: {config.description} -- {counted}{'; '.join(offenders[:SHOWN])}"
    return line + (f" (+{len(offenders) - SHOWN} more)" if len(offenders) > SHOWN else "")


def _clear_docs(docs: Path) -> None:
    """Remove a previous Data Docs build so the site shows this run only."""
    if docs.exists():
        if any(docs.iterdir()) and not (docs / "index.html").is_file():
            raise StageError(f"{docs}: exists and is not a Data Docs folder (no index.html); "
                             "refusing to overwrite it")
        shutil.rmtree(docs)


def validate(folder: Path, docs: Path, *, channels: int, min_images: int, max_images: int,
             min_images_per_class_per_split: int) -> Validation:
    """Decode every image of the ingested `folder`, run the suites, write Data Docs to `docs`.

    `channels` (data.channels) is what preprocessing converts to; it is recorded, not enforced.
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
    images = image_table(folder, rows)
    class_counts = class_count_table(images)

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _clear_docs(docs)
    context.add_data_docs_site(site_name=DOCS_SITE, site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = context.data_sources.add_pandas("kiln")
    tables = {"images": (images, ["path"]), "class_counts": (class_counts, ["split", "label"])}
    results = []
    for name, expectations in _suites(classes, min_images, max_images,
                                      min_images_per_class_per_split).items():
        frame, keys = tables[name]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # COMPLETE + index columns: each failed row comes back with its path (or split/label).
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": keys})
        results.extend(outcome.results)
    context.build_data_docs(site_names=[DOCS_SITE])

    failed = [r for r in results if not r.success]
    decoded = images[images.decodes]
    metrics = {
        "images": len(images),
        "classes": len(classes),
        "splits": {s: int((images.split == s).sum()) for s in SPLITS},
        "undecodable": int((~images.decodes.astype(bool)).sum()),
        "duplicates": int(decoded.content_hash.duplicated().sum()),
        "channels_in_files": sorted(int(c) for c in decoded.channels.unique()),
        "channels_model": channels,
        "checks_passed": len(results) - len(failed),
        "checks_failed": len(failed),
        "success": not failed,
    }
    return Validation(success=not failed, metrics=metrics,
                      failures=[failure_line(r, images) for r in failed], images=images)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline validate")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (manifest.csv)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--docs", type=Path, required=True, help="Data Docs folder to write")
    args = parser.parse_args(argv)
    p = load_params()
    result = validate(args.data, args.docs, channels=p.data.channels,
                      min_images=p.validate.min_images, max_images=p.validate.max_images,
                      min_images_per_class_per_split=p.validate.min_images_per_class_per_split)
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(result.metrics, indent=1) + "\n")
    m = result.metrics
    print(f"validate: {m['images']} images, {m['classes']} classes, {m['splits']}: "
          f"{m['checks_passed']} checks passed, {m['checks_failed']} failed; "
          f"Data Docs in {args.docs / 'index.html'}")
    if not result.success:
        raise StageError(f"{args.data}: {m['checks_failed']} data checks failed "
                         f"(details in {args.docs / 'index.html'}):\n  " + "\n  ".join(result.failures))
