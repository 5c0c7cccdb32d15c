"""validate passes a clean ingested set and names the files behind each failed expectation."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import StageError
from pipeline.ingest import ingest, read_manifest
from pipeline.params import load_params
from pipeline.validate import describe_image, validate

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")
CLASSES = ("a", "b", "c")
PER_CLASS = 10   # with the repo's 0.7/0.1/0.2 split: 7 train, 1 val, 2 test per class


def make_source(root: Path, per_class: int = PER_CLASS) -> Path:
    """<class>/<n>.png folders of distinct random 8x8 grayscale images."""
    rng = np.random.default_rng(0)
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / label / f"{i}.png")
    return root


@pytest.fixture
def ingested(tmp_path) -> Path:
    out = tmp_path / "ingested"
    ingest(str(make_source(tmp_path / "source")), out, PARAMS.data.split, PARAMS.data.seed)
    return out


def run(folder: Path, docs: Path, **overrides):
    """validate with the repo's params, min_images shrunk to fit the tiny test sets."""
    rules = {"min_images": 10, "max_images": PARAMS.validate.max_images,
             "min_images_per_class_per_split": PARAMS.validate.min_images_per_class_per_split}
    return validate(folder, docs, channels=PARAMS.data.channels, **{**rules, **overrides})


def rows_where(folder: Path, split: str, label: str) -> list[dict]:
    rows, _ = read_manifest(folder)
    return [r for r in rows if r["split"] == split and r["label"] == label]


def write_manifest(folder: Path, rows: list[dict]) -> None:
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)


def failure(result, expectation: str) -> str:
    lines = [line for line in result.failures if line.startswith(expectation)]
    assert lines, f"{expectation} did not fail; failures: {result.failures}"
    return lines[0]


def test_clean_set_passes_and_writes_docs(ingested, tmp_path):
    result = run(ingested, tmp_path / "docs")
    assert result.success, result.failures
    m = result.metrics
    assert m["images"] == len(CLASSES) * PER_CLASS
    assert m["splits"] == {"train": 21, "val": 3, "test": 6}
    assert m["checks_failed"] == 0 and m["checks_passed"] >= 10
    assert m["channels_in_files"] == [1] and m["undecodable"] == 0 and m["duplicates"] == 0
    assert (tmp_path / "docs" / "index.html").is_file()
    (page,) = (tmp_path / "docs" / "validations" / "images").rglob("*.html")
    assert "Every file decodes as an image" in page.read_text()
    assert result.images.decodes.all() and (result.images.height == 8).all()


def test_corrupt_file_fails_naming_it(ingested, tmp_path):
    bad = rows_where(ingested, "train", "b")[0]["path"]
    (ingested / bad).write_bytes(b"not a png")
    result = run(ingested, tmp_path / "docs")
    assert not result.success
    line = failure(result, "expect_column_values_to_be_in_set(decodes)")
    assert f"1 break it: {bad} (UnidentifiedImageError" in line
    assert result.metrics["undecodable"] == 1
    assert (tmp_path / "docs" / "index.html").is_file()


def test_duplicate_across_splits_fails_naming_both(ingested, tmp_path):
    train = rows_where(ingested, "train", "c")[0]["path"]
    test = rows_where(ingested, "test", "c")[0]["path"]
    shutil.copyfile(ingested / train, ingested / test)
    result = run(ingested, tmp_path / "docs")
    line = failure(result, "expect_column_values_to_be_unique(content_hash)")
    assert "2 break it:" in line and train in line and test in line
    assert result.metrics["duplicates"] == 1


def test_missing_class_in_split_fails_naming_it(ingested, tmp_path):
    rows, _ = read_manifest(ingested)
    write_manifest(ingested, [r for r in rows if not (r["split"] == "val" and r["label"] == "b")])
    result = run(ingested, tmp_path / "docs")
    line = failure(result, "expect_column_distinct_values_to_contain_set(label)")
    assert "val lacks class b" in line
    assert len(result.failures) == 1, result.failures


def test_too_few_images_fails_naming_row_count(ingested, tmp_path):
    result = run(ingested, tmp_path / "docs", min_images=100)
    line = failure(result, "expect_table_row_count_to_be_between")
    assert line.endswith("-- found 30 images") and "100 to" in line
    assert result.metrics["success"] is False and result.metrics["checks_failed"] == 1


def test_too_few_images_per_class_per_split(ingested, tmp_path):
    result = run(ingested, tmp_path / "docs", min_images_per_class_per_split=2)
    line = failure(result, "expect_column_values_to_be_between(images)")
    # val holds 1 image per class; train (7) and test (2) are enough
    assert "3 break it: val/a (1 images); val/b (1 images); val/c (1 images)" in line


def test_mixed_channels_and_16_bit_pixels_fail(ingested, tmp_path):
    rgb, wide = rows_where(ingested, "train", "a")[:2]
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(ingested / rgb["path"])
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(ingested / wide["path"])
    result = run(ingested, tmp_path / "docs")
    assert f"{rgb['path']} (3 channels)" in failure(
        result, "expect_column_unique_value_count_to_be_between(channels)")
    assert f"{wide['path']} (pixel_max=4000.0)" in failure(
        result, "expect_column_values_to_be_between(pixel_max)")


def test_unknown_label_fails_naming_file(ingested, tmp_path):
    rows, _ = read_manifest(ingested)
    rows[0]["label"] = "zebra"
    write_manifest(ingested, rows)
    result = run(ingested, tmp_path / "docs")
    assert f"{rows[0]['path']} (label=zebra)" in failure(
        result, "expect_column_values_to_be_in_set(label)")


def test_content_hash_ignores_encoding(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "fast.png", compress_level=0)
    Image.fromarray(pixels).save(tmp_path / "small.png", compress_level=9)
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    fast, small = describe_image(tmp_path / "fast.png"), describe_image(tmp_path / "small.png")
    assert (tmp_path / "fast.png").read_bytes() != (tmp_path / "small.png").read_bytes()
    assert fast["content_hash"] == small["content_hash"]
    assert describe_image(tmp_path / "palette.png")["channels"] == 3
    assert describe_image(tmp_path / "missing.png")["decodes"] is False


def test_empty_manifest_fails_without_crashing(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label,split\n")
    (tmp_path / "classes.json").write_text('["a"]')
    result = run(tmp_path, tmp_path / "docs")
    assert "found 0 images" in failure(result, "expect_table_row_count_to_be_between")
    assert result.metrics["images"] == 0


def test_missing_manifest_names_it(tmp_path):
    with pytest.raises(StageError, match="manifest.csv: not found"):
        run(tmp_path, tmp_path / "docs")


def test_refuses_to_overwrite_a_foreign_folder(ingested, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StageError, match="not a Data Docs folder"):
        run(ingested, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_fails_with_exit_1_and_writes_reports(ingested, tmp_path):
    """The dvc.yaml command with the repo's params: 30 images are fewer than min_images."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(REPO / "params.yaml", work / "params.yaml")
    bad = rows_where(ingested, "test", "a")[0]["path"]
    (ingested / bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "--data", str(ingested),
         "--metrics", "reports/validation.json", "--docs", "reports/data_docs"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "kiln validate: error:" in proc.stderr
    assert "expect_table_row_count_to_be_between: " in proc.stderr and "found 30 images" in proc.stderr
    assert "expect_column_values_to_be_in_set(decodes)" in proc.stderr and bad in proc.stderr
    metrics = json.loads((work / "reports" / "validation.json").read_text())
    assert metrics["success"] is False and metrics["checks_failed"] == 2
    assert (work / "reports" / "data_docs" / "index.html").is_file()
