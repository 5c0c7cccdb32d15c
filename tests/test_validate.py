"""validate passes a clean ingested set and names the files behind each failed expectation;
decoding in a process pool gives the same table; drift against a reference profile."""
import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from pipeline import StageError
from pipeline.core.drift import categorical_psi, continuous_scores
from pipeline.core.dataset import (SPLITS, ShardWriter, read_json_manifest, read_manifest,
                                   shard_files, write_items)
from pipeline.modalities.image import checks
from pipeline.modalities.image.checks import describe_image
from pipeline.modalities.image.sources import ingest_images
from pipeline.params import load_params
from pipeline.stages.validate import validate
from tests.ingested import described, items_of, rewrite
from tests.ingested import train_profile as profile_of

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


def ingest(source: str, out: Path, seed: int = PARAMS.data.seed) -> Path:
    """ingest_images of `source` into the shards of `out`, with the repo's params."""
    with ShardWriter(out, 1 << 30, 1 << 26) as writer:
        writer.close(ingest_images(source, writer, PARAMS.data.split, seed,
                                   PARAMS.ingest.max_file_bytes))
    return out


@pytest.fixture
def ingested(tmp_path) -> Path:
    return ingest(str(make_source(tmp_path / "source")), tmp_path / "ingested")


def run(folder: Path, docs: Path, reference=None, **overrides):
    """validate with the repo's params, min_items shrunk to fit the tiny test sets and
    allow_resize on (these images are 8x8)."""
    rules = dataclasses.replace(PARAMS.validate, **{"min_items": 10, **overrides})
    image = dataclasses.replace(PARAMS.image, validate=dataclasses.replace(
        PARAMS.image.validate, allow_resize=True))
    return validate(folder, docs, dataclasses.replace(PARAMS, image=image, validate=rules),
                    reference)


def rows_where(folder: Path, split: str, label: str) -> list[dict]:
    rows, _ = read_manifest(folder)
    return [r for r in rows if r["split"] == split and r["label"] == label]


def replace_bytes(folder: Path, changes: dict[str, bytes]) -> None:
    """The ingested items whose ids `changes` names hold its bytes instead."""
    rewrite(folder, [(row, changes.get(row["id"], data)) for row, data in items_of(folder)])


def failure(result, kind: str) -> str:
    lines = [line for line in result.failures if line.startswith(kind + ":")]
    assert lines, f"{kind} did not fail; failures: {result.failures}"
    return lines[0]


def test_clean_set_passes_and_writes_docs(ingested, tmp_path):
    result = run(ingested, tmp_path / "docs")
    assert result.success, result.failures
    m = result.metrics
    assert m["images"] == len(CLASSES) * PER_CLASS
    assert m["splits"] == {"train": 21, "val": 3, "test": 6}
    assert m["checks_failed"] == 0 and m["checks_passed"] == 12
    assert set(m["problems"].values()) == {0} and set(m["file_problems"].values()) == {0}
    assert m["converted"] == {} and m["undecodable"] == 0 and m["duplicates"] == 0
    assert m["drift"] == {"status": "skipped"}
    assert (tmp_path / "docs" / "index.html").is_file()
    pages = sorted((tmp_path / "docs" / "validations" / "images").rglob("*.html"))
    assert [p.name for p in pages] == [f"kiln-images-{s}-part-00000.html"  # a shard each
                                       for s in ("test", "train", "val")]
    assert ("Every file is one complete picture (PNG, JPEG, WebP, BMP, TIFF or GIF) that "
            "decodes") in pages[1].read_text()
    assert m["formats"] == {"PNG": len(CLASSES) * PER_CLASS}
    assert result.table.file_problem.isna().all() and (result.table.height == 8).all()
    assert result.profile["images"] == 21 and result.profile["categorical"]["size"] == {"8x8": 21}


def test_corrupt_file_fails_naming_it(ingested, tmp_path):
    bad = rows_where(ingested, "train", "b")[0]
    replace_bytes(ingested, {bad["id"]: b"not a png"})
    result = run(ingested, tmp_path / "docs")
    assert not result.success
    line = failure(result, "unreadable image file")
    assert (f"1 break it: not an accepted image: {bad['source']} (9 bytes starting "
            "b'not a png'; accepted: PNG, JPEG, WebP, BMP, TIFF or GIF)") in line
    assert result.metrics["undecodable"] == 1 and result.metrics["problems"]["unreadable_files"] == 1
    assert result.metrics["file_problems"]["not_an_accepted_image"] == 1
    assert (tmp_path / "docs" / "index.html").is_file()


def test_duplicate_across_splits_fails_naming_both(ingested, tmp_path):
    train = rows_where(ingested, "train", "c")[0]
    test = rows_where(ingested, "test", "c")[0]
    (data,) = [d for r, d in items_of(ingested, "train") if r["id"] == train["id"]]
    replace_bytes(ingested, {test["id"]: data})
    result = run(ingested, tmp_path / "docs")
    line = failure(result, "same image in two splits (leakage)")
    assert f"2 break it: {train['source']} (train) = {test['source']} (test)" in line
    assert result.metrics["duplicates"] == 1 and len(result.failures) == 1


def photos(count: int, classes: list[str]) -> list[tuple[dict, bytes]]:
    """`count` distinct 12x10 RGB JPEGs of made-up classes, their rows spread 60/15/25 over
    the splits: not the digits' size, colour, format or split shares."""
    rng = np.random.default_rng(7)
    items = []
    for i in range(count):
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=95)
        split = ("train", "train", "train", "val", "test")[i % 5] if i % 20 else "test"
        label = classes[i % len(classes)]
        items.append(({"id": f"photos/{split}/{label}/{i:04d}.jpg", "label": label,
                       "split": split, "source": f"shoot/{label}/{i:04d}.jpg"}, buf.getvalue()))
    return items


def test_a_bad_item_and_a_leak_in_other_shards_are_named_by_source(tmp_path):
    """Validate describes a shard at a time: a corrupt item in the third train shard, and a
    train photo copied into the last test shard (another shard, another split), still stop
    it naming their source files; the counts cover every shard."""
    classes = ["heron", "kestrel", "wren", "owl"]
    items = photos(360, classes)
    train = [i for i, (row, _) in enumerate(items) if row["split"] == "train"]
    test = [i for i, (row, _) in enumerate(items) if row["split"] == "test"]
    corrupt, original, copy = train[130], train[3], test[-1]
    items[corrupt] = (items[corrupt][0], items[corrupt][1][:200])  # cut short
    items[copy] = (items[copy][0], items[original][1])
    folder = tmp_path / "ingested"
    write_items(folder, items, classes, shard_items=40, row_group_bytes=8192)
    shards = {s: read_json_manifest(folder)["splits"][s]["shards"] for s in SPLITS}
    assert len(shards["train"]) >= 4 and len(shards["test"]) >= 2, shards
    # where the two landed: neither in the first shard of its split
    assert shard_of(folder, "train", items[corrupt][0]["id"]) >= 2
    assert shard_of(folder, "test", items[copy][0]["id"]) == len(shards["test"]) - 1

    result = run(folder, tmp_path / "docs")
    assert not result.success
    unreadable = failure(result, "unreadable image file")
    assert f"1 break it: truncated JPEG: {items[corrupt][0]['source']} (" in unreadable
    leak = failure(result, "same image in two splits (leakage)")
    assert (f"2 break it: {items[original][0]['source']} (train) = "
            f"{items[copy][0]['source']} (test)") in leak
    m = result.metrics
    assert m["images"] == 360 and m["undecodable"] == 1 and m["duplicates"] == 1
    assert m["problems"]["unreadable_files"] == 1 and m["problems"]["leaked_images"] == 2
    assert m["checks_failed"] == 2, result.failures
    assert m["splits"] == {s: sum(r["split"] == s for r, _ in items) for s in SPLITS}
    # one Great Expectations batch (a Data Docs page) per shard file, and one of the data set
    pages = list((tmp_path / "docs" / "validations" / "images").rglob("*.html"))
    assert len(pages) == sum(map(len, shards.values())), pages
    assert list((tmp_path / "docs" / "validations" / "data_set").rglob("*.html"))


def shard_of(folder: Path, split: str, item_id: str) -> int:
    """The index of the shard file of `split` that holds the item `item_id`."""
    import pyarrow.parquet as pq

    for k, path in enumerate(shard_files(folder, split)):
        if item_id in pq.read_table(path, columns=["id"]).column(0).to_pylist():
            return k
    raise AssertionError(f"{item_id} is in no {split} shard")


def test_missing_class_in_split_fails_naming_it(ingested, tmp_path):
    rewrite(ingested, [(r, d) for r, d in items_of(ingested)
                       if not (r["split"] == "val" and r["label"] == "b")])
    result = run(ingested, tmp_path / "docs")
    line = failure(result, "class short of images in a split")
    assert "1 break it: val/b (0 images)" in line
    assert len(result.failures) == 1, result.failures


def test_too_few_images_fails_naming_row_count(ingested, tmp_path):
    result = run(ingested, tmp_path / "docs", min_items=100)
    line = failure(result, "image count out of range")
    assert line.endswith("-- found 30") and "100 to" in line
    assert result.metrics["success"] is False and result.metrics["checks_failed"] == 1


def test_too_few_images_per_class_per_split(ingested, tmp_path):
    result = run(ingested, tmp_path / "docs", min_items_per_class_per_split=2)
    line = failure(result, "class short of images in a split")
    # val holds 1 image per class; train (7) and test (2) are enough
    assert "3 break it: val/a (1 images); val/b (1 images); val/c (1 images)" in line


def test_unknown_label_fails_naming_file(ingested, tmp_path):
    items = items_of(ingested)
    items[0][0]["label"] = "zebra"
    rewrite(ingested, items)
    rows, _ = read_manifest(ingested)
    result = run(ingested, tmp_path / "docs")
    assert f"{rows[0]['source']} (label=zebra)" in failure(result, "unknown label")


def test_an_id_given_twice_fails_naming_both_sources(ingested, tmp_path):
    """Ingest does not keep every id (a million would cost ~100 MB): an id a source gives twice
    is validate's to name."""
    items = items_of(ingested)
    items[1] = ({**items[1][0], "id": items[0][0]["id"]}, items[1][1])
    rewrite(ingested, items)
    result = run(ingested, tmp_path / "docs")
    words = failure(result, "an item id given twice")
    assert items[0][0]["source"] in words and items[1][0]["source"] in words, words


def test_a_new_check_is_one_registry_entry(ingested, tmp_path, monkeypatch):
    """A check added the way a modality's checks.py adds its own (one decorated function) runs,
    names its offenders, counts them under its key and stops the stage like any other."""
    from pipeline.core.checks import Checks, showing
    from pipeline.modalities.image import checks

    mine = Checks()
    for check in checks.CHECKS:
        mine._checks.append(check)

    @mine.check("too_dark", "too dark an image", name=showing("mean {pixel_mean:.0f}"))
    def bright_enough(E, d):
        return E.ExpectColumnValuesToBeBetween(column="pixel_mean", min_value=200,
                                               description="Every image is bright.")

    monkeypatch.setattr(checks, "CHECKS", mine)
    result = run(ingested, tmp_path / "docs")
    assert not result.success and result.metrics["problems"]["too_dark"] == 30
    line = failure(result, "too dark an image")
    assert "Every image is bright. -- 30 break it: " in line and "(mean 1" in line


def test_content_hash_ignores_encoding(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "fast.png", compress_level=0)
    Image.fromarray(pixels).save(tmp_path / "small.png", compress_level=9)
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    fast, small, palette = (describe_image((tmp_path / name).read_bytes(), PARAMS.image.preprocess)
                            for name in ("fast.png", "small.png", "palette.png"))
    assert (tmp_path / "fast.png").read_bytes() != (tmp_path / "small.png").read_bytes()
    assert fast["content_hash"] == small["content_hash"]
    assert palette["mode"] == "P" and palette["channels"] == 1  # converted to image.preprocess.channels


def test_empty_manifest_fails_without_crashing(tmp_path):
    write_items(tmp_path, [], ["a"])
    result = run(tmp_path, tmp_path / "docs")
    assert "found 0" in failure(result, "image count out of range")
    assert result.metrics["images"] == 0


def test_missing_manifest_names_it(tmp_path):
    with pytest.raises(StageError,
                       match=r"manifest\.json: not found \(run the ingest stage first\)"):
        run(tmp_path, tmp_path / "docs")


def test_refuses_to_overwrite_a_foreign_folder(ingested, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StageError, match="not a Data Docs folder"):
        run(ingested, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_data_docs_page_loading_from_outside_is_named(tmp_path):
    """A GX release that links a CDN file vendor/ does not hold: the stage stops, naming the
    page and the URL, rather than write Data Docs that need the internet."""
    from pipeline.core.data_docs import make_offline

    (tmp_path / "docs" / "static").mkdir(parents=True)
    (tmp_path / "docs" / "index.html").write_text(
        '<link rel="stylesheet" href="https://cdn.example.org/new.css">')
    with pytest.raises(StageError, match=r"docs/index\.html: .*https://cdn\.example\.org/new\.css"):
        make_offline(tmp_path / "docs")


def test_the_executor_gives_the_same_table(ingested, running):
    serial = described(ingested, checks, PARAMS)[0]
    running(workers=2, batch=4)  # 30 files -> 8 tasks over 2 processes
    parallel = described(ingested, checks, PARAMS)[0]
    pd.testing.assert_frame_equal(serial, parallel)
    assert serial.content_hash.notna().all()


# --- drift against a reference profile, on the bundled digits ------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, dict]:
    """The digits ingested with the repo's params, and the profile of their train split."""
    folder = ingest("digits", tmp_path_factory.mktemp("digits") / "ingested")
    return folder, train_profile(folder)


def train_profile(folder: Path) -> dict:
    return profile_of(folder, checks, PARAMS)


def shifted(digits_folder: Path, tmp_path: Path, change) -> Path:
    """A copy of the ingested digits with `change(PIL image) -> PIL image` on every train image."""
    folder = tmp_path / "shifted"
    shutil.copytree(digits_folder, folder)
    changes = {}
    for row, data in items_of(folder, "train"):
        with Image.open(io.BytesIO(data)) as image:
            png = io.BytesIO()
            change(image).save(png, format="PNG")
        changes[row["id"]] = png.getvalue()
    replace_bytes(folder, changes)
    return folder


def test_profile_scores_are_zero_on_itself_and_one_when_disjoint():
    assert continuous_scores([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], bins=2) == (0.0, 0.0)
    psi, ks = continuous_scores([0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0], bins=2)
    assert ks == 1.0 and psi > 4  # ln(1 / PSI_FLOOR) per emptied bin
    assert categorical_psi({"a": 5, "b": 5}, {"a": 50, "b": 50}) == 0.0
    assert categorical_psi({"a": 5, "b": 5}, {"a": 9, "b": 1}) > PARAMS.drift.psi_fail


def test_unshifted_data_shows_no_drift(digits, tmp_path):
    """Another seeded split of the same digits: a different sample, the same population."""
    folder, reference = digits
    resplit = ingest("digits", tmp_path / "resplit", PARAMS.data.seed + 1)
    result = run(resplit, tmp_path / "docs", reference=reference, min_items=100)
    assert result.success, result.failures
    assert result.warnings == [] and result.metrics["drift"]["status"] == "ok"
    for feature, score in result.metrics["drift"]["features"].items():
        assert score["psi"] < PARAMS.drift.psi_warn, feature
        assert score["ks"] is None or score["ks"] < PARAMS.drift.ks_warn, feature
    assert (tmp_path / "docs/validations/drift").is_dir()


def test_inverted_images_fail_on_drift(digits, tmp_path):
    folder, reference = digits
    inverted = shifted(folder, tmp_path, ImageOps.invert)
    result = run(inverted, tmp_path / "docs", reference=reference, min_items=100)
    assert not result.success and result.metrics["drift"]["status"] == "fail"
    line = failure(result, "drift from the champion's data")
    assert "pixel_mean PSI" in line and "params drift.psi_fail" in line
    assert result.metrics["drift"]["features"]["pixel_mean"]["ks"] > PARAMS.drift.ks_fail
    assert len(result.failures) == 2  # PSI and KS, both on pixel_mean; nothing else broke
    (page,) = (tmp_path / "docs/validations/drift").rglob("*.html")
    assert "Population stability index below" in page.read_text()


def test_brighter_images_fail_on_drift(digits, tmp_path):
    """+20 on every pixel of the train split (0..255, clipped)."""
    folder, reference = digits
    brighter = shifted(folder, tmp_path, lambda im: im.point(lambda v: min(255, v + 20)))
    result = run(brighter, tmp_path / "docs", reference=reference, min_items=100)
    assert not result.success and result.metrics["drift"]["status"] == "fail"
    assert "pixel_mean PSI" in failure(result, "drift from the champion's data")


def rebalanced(folder: Path, tmp_path: Path, keep_one_in: int) -> Path:
    """A copy whose train split keeps 1 in `keep_one_in` images of classes 0-4."""
    changed = tmp_path / "balance"
    shutil.copytree(folder, changed)
    rewrite(changed, [(r, d) for i, (r, d) in enumerate(items_of(changed)) if not (
        r["split"] == "train" and r["label"] in "01234" and i % keep_one_in)])
    return changed


def test_changed_class_balance_warns(digits, tmp_path):
    """Classes 0-4 at half their share (~6.7 % each, 5-9 at ~13 %): label PSI ~0.12, between
    drift.psi_warn and drift.psi_fail."""
    folder, reference = digits
    result = run(rebalanced(folder, tmp_path, 2), tmp_path / "docs", reference=reference,
                 min_items=100)
    assert result.success, result.failures
    assert result.metrics["drift"]["status"] == "warn"
    (warning,) = result.warnings
    assert warning.startswith("drift warning:") and "label PSI 0.1" in warning


def test_changed_class_balance_fails_on_drift(digits, tmp_path):
    """Classes 0-4 at a fifth of their share: label PSI ~0.5."""
    folder, reference = digits
    result = run(rebalanced(folder, tmp_path, 5), tmp_path / "docs", reference=reference,
                 min_items=100)
    assert not result.success
    assert "label PSI" in failure(result, "drift from the champion's data")
    assert result.metrics["drift"]["features"]["label"]["psi"] > PARAMS.drift.psi_fail
