"""The bad-data matrix: each kind of bad data, put into a user's image folder, stops the run at
ingest or validate with exit 1 and a message naming the kind and the offending file or class;
hidden/system files and odd class names go through. Each test builds its folder, writes a project
params.yaml (the repo's, shrunk by conftest's params_writer, with image.ingest.source pointed at the
folder) and runs the stage entry point:
some as `python -m pipeline.stages` subprocesses, the rest through pipeline.stages.__main__.main() in-process
(same code path, minus ~3 s of imports each)."""
from __future__ import annotations

import io
import json
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.dataset import read_manifest
from tests.ingested import items_of
from tests.stage_runs import VALIDATE, cli, ingest_and_validate, manifest, problems

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c")
PER_CLASS = 10   # with the repo's 0.7/0.1/0.2 split: 7 train, 1 val, 2 test per class
SIDE = 32        # px, the repo's image.preprocess.image_size


def pixels(seed: int, side: int = SIDE, channels: int = 1) -> np.ndarray:
    shape = (side, side) if channels == 1 else (side, side, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def make_source(root: Path, classes=CLASSES, splits=("",)) -> Path:
    """<split>/<class>/<n>.png folders of distinct random grayscale images."""
    seed = 0
    for split in splits:
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(PER_CLASS):
                seed += 1
                (root / split / label / f"{i}.png").write_bytes(png_bytes(pixels(seed)))
    return root


# --- files that are not usable images --------------------------------------------------------

def test_corrupt_bytes(tmp_path, project, stage):
    source = make_source(tmp_path / "src")
    data = bytearray((source / "b/3.png").read_bytes())
    data[60:80] = bytes(20)  # inside the image data: the PNG checksum no longer matches
    (source / "b/3.png").write_bytes(bytes(data))
    work = project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "kiln validate: error:" in out and "unreadable image file" in out
    assert "1 break it: corrupt PNG: b/3.png (" in out
    assert problems(work)["unreadable_files"] == 1


def half_copied(source: Path, name: str, fmt: str) -> None:
    """A file cut at half its bytes, as an interrupted copy leaves it."""
    whole = png_bytes(pixels(99), fmt)
    (source / name).write_bytes(whole[:len(whole) // 2])


def test_truncated_png(tmp_path, project):
    """Through the CLI, with the reports a failed run still writes."""
    source = make_source(tmp_path / "src")
    half_copied(source, "a/half.png", "PNG")
    work = project(source)
    assert cli(work, "ingest", "--out", "data/ingested").returncode == 0
    done = cli(work, *VALIDATE)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "kiln validate: error:" in done.stderr and "unreadable image file" in done.stderr
    assert "1 break it: truncated PNG: a/half.png (OSError: image file is truncated)" in done.stderr
    metrics = json.loads((work / "reports/validation.json").read_text())
    details = json.loads((work / "reports/validation_details.json").read_text())
    assert details["file_problems"]["truncated_PNG"] == 1 and metrics["success"] is False
    assert (work / "reports/data_docs/index.html").is_file()


def test_truncated_jpeg(tmp_path, project, stage):
    source = make_source(tmp_path / "src")
    half_copied(source, "b/half.jpg", "JPEG")
    code, out = ingest_and_validate(stage, project(source))
    assert code == 1 and "1 break it: truncated JPEG: b/half.jpg (OSError: image file is truncated" in out


def test_zero_byte_file(tmp_path, project, stage):
    source = make_source(tmp_path / "src")
    (source / "c/empty.png").write_bytes(b"")
    code, out = ingest_and_validate(stage, project(source))
    assert code == 1 and "empty file: c/empty.png (0 bytes)" in out


def test_non_image_with_image_extension(tmp_path, project, stage):
    """Text named .png, and an icon (a format PIL reads, Kiln and its server do not) named .jpg:
    each named with what it is. A GIF named .jpg would be read as the GIF it is: the content
    decides, not the name (tests/test_formats.py)."""
    source = make_source(tmp_path / "src")
    (source / "a/notes.png").write_text("meeting notes, not a picture\n")
    Image.fromarray(pixels(5)).save(source / "b/really_an_icon.jpg", "ICO")
    code, out = ingest_and_validate(stage, project(source))
    assert code == 1
    assert "2 break it:" in out
    assert ("not an accepted image: a/notes.png (29 bytes starting b'meeting note'; accepted: "
            "PNG, JPEG, WebP, BMP, TIFF or GIF)") in out
    assert "not an accepted image: b/really_an_icon.jpg (ICO image; accepted: " in out


def test_broken_link_fails_at_ingest(tmp_path, project):
    """Through the CLI: a link whose target is gone is named, instead of an image going missing."""
    source = make_source(tmp_path / "src")
    (source / "b/moved.png").symlink_to(tmp_path / "nowhere.png")
    done = cli(project(source), "ingest", "--out", "data/ingested")
    assert done.returncode == 1
    assert "kiln ingest: error:" in done.stderr
    assert "refused 1 entries named like images (" in done.stderr
    assert f"b/moved.png (a link to {tmp_path / 'nowhere.png'}, which does not exist)" in done.stderr


def test_only_regular_files_inside_the_folder_within_the_size_limit_are_taken(tmp_path, project, stage):
    """Links out of the folder (a device, a system file), a FIFO, a directory named like an image
    and a file over ingest.max_file_bytes: each named, nothing copied, nothing read from them."""
    source = make_source(tmp_path / "src")
    (source / "a/zero.png").symlink_to("/dev/zero")
    (source / "a/passwd.png").symlink_to("/etc/passwd")
    (source / "b/folder.png").mkdir()
    (source / "b/folder.png/0.png").write_bytes(png_bytes(pixels(70)))
    os.mkfifo(source / "b/pipe.jpg")  # opening it to copy would block forever
    (source / "c/huge.png").write_bytes(png_bytes(pixels(71, side=128)))  # ~16 KB
    (source / "c/linked.png").symlink_to("../a/0.png")  # stays inside the folder: taken
    code, out = stage(project(source, ingest={"max_file_bytes": 4096}), "ingest", "--out",
                      "data/ingested")
    assert code == 1
    assert "kiln ingest: error:" in out and "refused 5 entries named like images" in out
    assert "a/zero.png (a link to /dev/zero, outside the data folder)" in out
    assert "a/passwd.png (a link to /etc/passwd, outside the data folder)" in out
    assert "b/folder.png (a directory named like an image)" in out
    assert "b/pipe.jpg (a FIFO)" in out
    huge = (source / "c/huge.png").stat().st_size
    assert f"c/huge.png ({huge} bytes, over ingest.max_file_bytes 4096)" in out
    assert "linked.png" not in out
    assert not (tmp_path / "project/data/ingested/manifest.json").exists()
    assert not (tmp_path / "project/data/ingested/shards").exists()


def test_a_link_inside_the_folder_is_followed(tmp_path, project, stage):
    source = make_source(tmp_path / "src")
    (source / "c/10.png").symlink_to("../a/0.png")
    work = project(source)
    code, out = stage(work, "ingest", "--out", "data/ingested")
    assert code == 0, out
    (data,) = [d for r, d in items_of(work / "data/ingested") if r["source"] == "c/10.png"]
    assert data == (source / "a/0.png").read_bytes()  # the target's bytes, not a link


# --- classes -----------------------------------------------------------------------------------

def test_class_folder_with_no_images(tmp_path, project, stage):
    source = make_source(tmp_path / "src")
    (source / "d").mkdir()
    (source / "d/.DS_Store").write_bytes(b"\0\1")  # hidden files do not count as images
    work = project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "class with no images:" in out and "1 break it: class 'd' (0 images)" in out
    # the empty class is reported once, not again as missing from every split
    assert "class short of images in a split" not in out
    assert problems(work)["empty_classes"] == 1


def test_single_class(tmp_path, project, stage):
    code, out = ingest_and_validate(stage, project(make_source(tmp_path / "src", ("a",))))
    assert code == 1
    assert "single class: The data set has at least two classes" in out and "found 1" in out


def test_class_missing_from_a_split(tmp_path, project, stage):
    source = make_source(tmp_path / "src", splits=("train", "val", "test"))
    shutil.rmtree(source / "val/b")
    code, out = ingest_and_validate(stage, project(source))
    assert code == 1 and "class short of images in a split" in out and "val/b (0 images)" in out


# --- leakage and duplicates --------------------------------------------------------------------

def test_same_image_in_two_splits(tmp_path, project, stage):
    """A pre-split folder: a training image copied byte for byte into test under another name,
    and another re-encoded (other bytes, same pixels) into val."""
    source = make_source(tmp_path / "src", splits=("train", "val", "test"))
    shutil.copyfile(source / "train/a/0.png", source / "test/a/IMG_0001.png")
    Image.open(source / "train/b/4.png").save(source / "val/b/copy.png", compress_level=0)
    assert (source / "train/b/4.png").read_bytes() != (source / "val/b/copy.png").read_bytes()
    work = project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "same image in two splits (leakage):" in out and "4 break it:" in out
    assert "train/a/0.png (train) = test/a/IMG_0001.png (test)" in out
    assert "train/b/4.png (train) = val/b/copy.png (val)" in out
    assert "duplicate images in a split" not in out
    assert problems(work)["leaked_images"] == 4


def test_duplicate_within_a_split(tmp_path, project, stage):
    source = make_source(tmp_path / "src", splits=("train", "val", "test"))
    shutil.copyfile(source / "train/c/1.png", source / "train/c/1 (copy).png")
    code, out = ingest_and_validate(stage, project(source))
    assert code == 1 and "duplicate images in a split:" in out
    assert "train/c/1 (copy).png (train) = train/c/1.png (train)" in out
    assert "leakage" not in out


# --- pixels and sizes --------------------------------------------------------------------------

def test_images_of_other_modes_are_converted_and_counted(tmp_path, project, stage):
    """Palette, gray+alpha, RGBA, CMYK JPEG, 16-bit and RGB files in a grayscale data set
    (image.preprocess.channels 1) are converted, not refused; the report counts them per original mode."""
    source = make_source(tmp_path / "src")
    alpha = Image.fromarray(pixels(81))
    Image.fromarray(pixels(80)).convert("P").save(source / "a/palette.png", transparency=3)
    Image.merge("LA", (Image.fromarray(pixels(82)), alpha)).save(source / "a/gray_alpha.png")
    Image.fromarray(pixels(83, channels=4), mode="RGBA").save(source / "b/rgba.png")
    Image.fromarray(pixels(84, channels=3)).convert("CMYK").save(source / "b/cmyk.jpg", "JPEG")
    Image.fromarray(pixels(85).astype(np.uint16) * 257).save(source / "c/deep.png")
    Image.fromarray(pixels(86, channels=3)).save(source / "c/colour.png")
    work = project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    converted = {"CMYK": 1, "I;16": 1, "LA": 1, "P": 1, "RGB": 1, "RGBA": 1}
    assert json.loads((work / "reports/validation.json").read_text())["converted"] == converted
    assert ("validate: 6 images converted to L (image.preprocess.channels 1), by original mode: "
            "CMYK 1, I;16 1, LA 1, P 1, RGB 1, RGBA 1") in out


def test_size_when_resizing_is_forbidden(tmp_path, project, stage):
    source = make_source(tmp_path / "src")
    Image.fromarray(pixels(8, side=64)[:48]).save(source / "c/big.png")   # 64 wide, 48 high
    Image.fromarray(pixels(9, side=33)).save(source / "a/near.png")       # one px off is off too
    code, out = ingest_and_validate(stage, project(source, {"validate": {"allow_resize": False}}))
    assert code == 1
    assert "image size far from image.preprocess.image_size: Every image is already 32x32 px" in out
    assert "2 break it:" in out and "c/big.png (64x48 px)" in out and "a/near.png (33x33 px)" in out


def test_size_far_off_even_when_resizing_is_allowed(tmp_path, project, stage):
    source = make_source(tmp_path / "src")
    Image.fromarray(pixels(8, side=3)).save(source / "b/thumb.png")   # 32 / 3 > 8x
    Image.fromarray(pixels(9, side=64)).save(source / "b/fine.png")   # 2x: resized, fine
    code, out = ingest_and_validate(stage, project(source, {"validate": {"max_resize_factor": 8.0}}))
    assert code == 1
    assert "within 8x of image.preprocess.image_size 32 px" in out
    assert "1 break it: b/thumb.png (3x3 px)" in out and "fine.png" not in out


@pytest.mark.parametrize("blank, fails", [(1, False), (3, True)])
def test_blank_images_above_the_threshold(tmp_path, project, stage, blank, fails):
    """33 images with max_blank_fraction 0.05: 1 blank (3 %) passes, 3 blank (9 %) fail. The
    blank images are identical to each other, and that is not reported as duplicates."""
    source = make_source(tmp_path / "src")
    for i in range(blank):
        Image.fromarray(np.full((SIDE, SIDE), 255 * (i % 2), np.uint8)).save(source / "abc"[i] / "blank.png")
    for i in range(blank, 3):
        Image.fromarray(pixels(50 + i)).save(source / "abc"[i] / "blank.png")  # fill to 33
    work = project(source, {"validate": {"max_blank_fraction": 0.05}})
    code, out = ingest_and_validate(stage, work)
    assert code == (1 if fails else 0), out
    if fails:
        assert "too many blank images: At most 5.0% of the images are blank" in out
        # offenders in read order, split by split: b/blank.png is not in train
        assert "3 break it: 9.1% blank; a/blank.png; c/blank.png (+1 more)" in out
        assert "duplicate" not in out and "leakage" not in out
    assert problems(work)["blank_images"] == (3 if fails else 0)


# --- tolerated: hidden/system files, odd class names -----------------------------------------

def test_hidden_and_system_files_are_ignored(tmp_path, project):
    """Through the CLI, first run (no champion yet): desktop and archive leftovers are skipped."""
    source = make_source(tmp_path / "src")
    (source / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (source / "a/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (source / "b/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (source / "b/desktop.ini").write_text("[.ShellClassInfo]\n")
    (source / "c/._0.png").write_bytes(b"\0\5\26\7 AppleDouble resource fork")  # macOS copy junk
    (source / "__MACOSX/a").mkdir(parents=True)
    (source / "__MACOSX/a/._1.png").write_bytes(b"\0\5\26\7")
    (source / ".ipynb_checkpoints").mkdir()
    work = project(source)
    ingested = cli(work, "ingest", "--out", "data/ingested")
    assert ingested.returncode == 0, ingested.stderr
    assert "ingest: skipped 7 hidden, system or non-image entries" in ingested.stdout
    assert "ingest: 30 images" in ingested.stdout
    validated = cli(work, *VALIDATE)
    assert validated.returncode == 0, validated.stderr
    assert "drift not checked: no champion of task kiln-classifier-" in validated.stdout
    assert "in reports/champion.json yet" in validated.stdout
    assert read_manifest(work / "data/ingested")[1] == list(CLASSES)
    metrics = json.loads((work / "reports/validation.json").read_text())
    details = json.loads((work / "reports/validation_details.json").read_text())
    assert metrics["success"] and metrics["checks_failed"] == 0 and details["drift"]["status"] == "skipped"
    assert details["drift"]["reason"] in validated.stdout  # what the run summary repeats
    assert set(details["problems"].values()) == {0}
    assert json.loads((work / "reports/data_profile.json").read_text())["images"] == 21  # train


def test_odd_class_names_are_handled(tmp_path, project, stage):
    """Spaces, accents and non-Latin scripts are labels like any other; the same name in NFD
    (as macOS writes it) in one split and NFC in another is one class, not two."""
    nfd = unicodedata.normalize("NFD", "café")
    names = ("hot dog", "日本語", "café")
    source = make_source(tmp_path / "src", names, splits=("train", "val", "test"))
    (source / "val/café").rename(source / "val" / nfd)
    (source / "test/hot dog").rename(source / "test/hot dog ")  # a trailing blank
    assert nfd != "café" and (source / "val" / nfd).is_dir()
    work = project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    assert read_manifest(work / "data/ingested")[1] == sorted(names)
    metrics = json.loads((work / "reports/validation.json").read_text())
    assert metrics["classes"] == 3 and metrics["splits"] == {"train": 30, "val": 30, "test": 30}
    assert "images/val/café/0.png" in {r["id"] for r in manifest(work)}


def test_two_folders_for_one_class_fail_at_ingest(tmp_path, project, stage):
    source = make_source(tmp_path / "src", ("cat", "dog"))
    (source / "cat").rename(source / unicodedata.normalize("NFD", "çat"))
    shutil.copytree(source / "dog", source / "çat")
    code, out = stage(project(source), "ingest", "--out", "data/ingested")
    assert code == 1 and "two class folders for the same class 'çat'" in out
