"""The validate stage's image part (data.modality image): the images table, its Great
Expectations checks, the data profile and drift features. pipeline/stages/validate.py runs them with the
checks every modality shares (manifest, classes, PSI/KS drift) and reports failures the same way
(GX report, Data Docs, one line per failed kind).

    images   one row per ingested item: path, source, label, split, file_problem (why the file
             is not one usable picture in an accepted format, pipeline/modalities/image/preprocess.py
             IMAGE_FORMATS: empty, truncated, corrupt, several frames, pixels that cannot be
             converted, not an accepted image), format and mode (PIL's, as decoded), then of
             the pixels converted to image.preprocess.channels by
             pipeline/modalities/image/preprocess.py as every later consumer converts them: height, width,
             channels, pixel_min/max/mean/std, content_hash (sha256 of those pixels, so a copy
             under another name or re-encoded losslessly collides), and flags derived from
             those: blank, alike (compared for copies), resize_factor; validate adds leak,
             duplicate and repeated over the whole data set (pipeline/core/copies.py)

Images of any mode PIL decodes (palette, gray or RGB with alpha, CMYK, 16-bit) are converted, not
refused: the metrics count them per original mode (`converted`), and every decoded image per
format (`formats`). An animated GIF, WebP or PNG, a multi-page TIFF and float pixels are refused
by name (preprocess.refusal), as the server refuses them. Decoding and hashing run through
the executor (pipeline/core/executor.py, in parallel), a shard at a time: the parent holds one
shard's table, never pixels, and of every image only the MERGED columns the data-set checks,
metrics and profile read.

Drift features of the train split (pipeline/core/drift.py scores them):
    label              class balance                       PSI
    size, channels     image size ("HxW") and channels     PSI
    pixel_mean         per-image brightness, 0..255        PSI and KS
    pixel_std          per-image contrast, 0..255          PSI and KS
"""
from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.checks import Checks, Data, file_problems
from pipeline.core.copies import KEY
from pipeline.core.drift import PROFILE_QUANTILES, PROFILE_VERSION, DriftReport, compare, counted
from pipeline.core.dataset import described_table
from pipeline.modalities.image.preprocess import ACCEPTED, IMAGE_FORMATS, MODES, refusal, to_channels
from pipeline.modalities.image.config import Preprocess
from pipeline.params import Params

# What --metrics holds (the rest of Validation.metrics goes to --details): the counts a person
# compares across runs with `dvc metrics diff` / `dvc exp show`.
SUMMARY = ("images", "classes", "splits", "undecodable", "converted", "duplicates",
           "checks_passed", "checks_failed", "success")
# Every key of Validation.metrics, in the order the details JSON holds them.
METRICS = ("images", "classes", "splits", "undecodable", "duplicates", "formats", "converted",
           "channels_model", "checks_passed", "checks_failed", "problems", "file_problems", "drift",
           "success")
PNG_MAGIC, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
JPEG_MAGIC, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
GIF_END = b";"  # the trailer byte
# The accepted formats as messages name them, in file_problem's kinds
NAMES = ("PNG", "JPEG", "WebP", "BMP", "TIFF", "GIF")
FILE_PROBLEMS = ("empty file", *(f"{how} {name}" for name in NAMES for how in ("truncated",
                                                                                "corrupt")),
                 "several frames", "unconvertible pixels", "not an accepted image")
# (what describe_image names; an ingested item's bytes are in the shards: none is unreadable)
COLUMNS = ["path", "source", "label", "split", "file_problem", "decode_error", "format", "mode",
           "height", "width", "channels", "pixel_min", "pixel_max", "pixel_mean", "pixel_std",
           "content_hash"]

# The columns validate keeps of every image for the data-set checks, metrics and profile; FLAGS:
# the rows the data-set checks name (their path and source are kept too)
MERGED = ("file_problem", "format", "mode", "height", "width", "channels", "pixel_mean",
          "pixel_std")
FLAGS = ("blank",)

CATEGORICAL = ("label", "size", "channels")  # drift features scored by PSI
CONTINUOUS = ("pixel_mean", "pixel_std")     # and by PSI and KS

SAME = "compared by their pixels in image.preprocess.channels"  # as content_hash is
CHECKS = Checks()  # the images table's own checks (pipeline/core/checks.py has the shared ones)


def sniffed(data: bytes) -> str | None:
    """The accepted format (as NAMES says it) that the first bytes of `data` announce, or None."""
    if data.startswith(PNG_MAGIC):
        return "PNG"
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM" and data[6:10] == bytes(4):  # reserved fields: zero
        return "BMP"
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # classic and BigTIFF
        return "TIFF"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def cut_short(name: str, data: bytes, error: Exception) -> bool:
    """Whether a file of format `name` that did not decode ends before its own structure says
    it does (an interrupted copy or download)."""
    body = data.rstrip(b"\0\r\n ")  # some tools pad files; padding does not make them whole
    if name == "PNG":
        return not body.endswith(PNG_END)
    if name == "JPEG":
        return not body.endswith(JPEG_END)
    if name == "GIF":
        return not body.endswith(GIF_END)
    if name == "WebP":  # the RIFF header's length of what follows it
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    if name == "BMP":  # the header's file length (0 where the writer left it unset)
        return len(data) < int.from_bytes(data[2:6], "little")
    # TIFF: its directories and strips may lie anywhere in the file; PIL says when it ran out
    return "truncated" in str(error)


def file_problem(data: bytes, error: Exception) -> tuple[str, str]:
    """(kind, detail) of a file that did not decode as an accepted image, PIL's `error` in hand:
    the kind for the message and the metrics, the detail saying what was found."""
    if not data:
        return "empty file", "0 bytes"
    name = sniffed(data)
    if name is None:
        try:  # what it is, if another PIL plugin knows it: ICO, PPM, PSD, ... (never decoded)
            with Image.open(io.BytesIO(data)) as other:
                found = f"{other.format} image"
        except Exception:  # noqa: BLE001 (PIL raises many types for bytes it does not know)
            found = f"{len(data)} bytes starting {data[:12]!r}"
        return "not an accepted image", f"{found}; accepted: {ACCEPTED}"
    how = "truncated" if cut_short(name, data, error) else "corrupt"
    return f"{how} {name}", f"{type(error).__name__}: {error}"


def describe_image(data: bytes, prep: Preprocess) -> dict:
    """Format and mode as decoded, then size, channels, pixel statistics and content hash of one
    file's pixels converted to image.preprocess.channels (over its background); or, when it is not one
    usable picture in an accepted format, file_problem (the kind) and decode_error (the cause:
    PIL's words, or what the file is)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            refused = refusal(image)
            if refused:
                return {"file_problem": refused[0], "decode_error": refused[1],
                        "format": image.format, "mode": image.mode}
            image.load()
            fmt, mode = image.format, image.mode
            try:
                pixels = np.asarray(to_channels(image, prep.channels, prep.background))
            except (ValueError, OSError) as e:  # e.g. LAB, which PIL cannot convert to RGB
                return {"file_problem": "unconvertible pixels", "format": fmt, "mode": mode,
                        "decode_error": f"{mode} pixels: {e}"}
    # PIL's decoders raise many types for a broken file (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...): any of them means "does not decode".
    except Exception as e:  # noqa: BLE001
        kind, detail = file_problem(data, e)
        return {"file_problem": kind, "decode_error": detail}
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype.str}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    low, high = pixels.min(), pixels.max()
    return {
        "file_problem": None, "decode_error": None, "format": fmt, "mode": mode,
        "height": pixels.shape[0], "width": pixels.shape[1],
        "channels": 1 if pixels.ndim == 2 else pixels.shape[2],
        "pixel_min": float(low), "pixel_max": float(high),
        "pixel_mean": float(pixels.mean()),
        # a constant image has std 0 exactly; skip the float pass for it
        "pixel_std": 0.0 if low == high else float(pixels.std()),
        "content_hash": digest.hexdigest(),
    }


def image_table(shard: Path, prep: Preprocess) -> pd.DataFrame:
    """One row per item of a shard file with its description (pipeline/core/executor.py: in
    parallel)."""
    table = described_table(shard, functools.partial(describe_image, prep=prep), COLUMNS)
    # An empty manifest would leave object columns, which pandas treats as column labels.
    return table.astype({"pixel_std": float, "height": float, "width": float})


def add_flags(images: pd.DataFrame, image_size: int) -> pd.DataFrame:
    """Columns the suites check that need a param or more than the row: blank, alike,
    resize_factor. Files that do not decode get False / NaN, and blank images are not compared
    for copies (all-black images are identical by nature): each problem is reported once, by
    its own check."""
    decoded = images.content_hash.notna()
    blank = decoded & (images.pixel_std == 0)
    side = images[["height", "width"]]
    factor = np.maximum(side.max(axis=1) / image_size, image_size / side.min(axis=1))
    return images.assign(blank=blank, alike=decoded & ~blank, resize_factor=factor.round(3))



def profile(images: pd.DataFrame) -> dict:
    """Reference statistics (pipeline/core/drift.py's layout) of the decodable rows of an images
    table."""
    decoded = images[images.file_problem.isna()]
    size = decoded.width.astype(int).astype(str) + "x" + decoded.height.astype(int).astype(str)
    columns = {"label": decoded.label, "size": size,
               "channels": decoded.channels.astype(int).astype(str)}
    levels = np.linspace(0, 1, PROFILE_QUANTILES)
    return {
        "version": PROFILE_VERSION,
        "images": len(decoded),
        "categorical": {name: counted(col) for name, col in columns.items()},
        "quantiles": {name: (np.quantile(decoded[name].to_numpy(float), levels,
                                         method="inverted_cdf").round(4).tolist()
                             if len(decoded) else [])
                      for name in CONTINUOUS},
    }


def shard_table(shard: Path, params: Params) -> tuple[pd.DataFrame, None]:
    """The images table of one shard file (decoded in parallel, row flags included); images
    need nothing else for their profile."""
    prep = params.image.preprocess
    return add_flags(image_table(shard, prep), prep.image_size), None


def conclude(table: pd.DataFrame, extras: list, params: Params, reference: dict | None
             ) -> tuple[dict, DriftReport | None]:
    """The profile of the data set's train split and that split's drift from `reference`."""
    current = profile(table[table.split == "train"])
    report = compare(reference, current, params.drift, CATEGORICAL, CONTINUOUS) \
        if reference is not None else None
    return current, report


@CHECKS.check("unreadable_files", "unreadable image file", name=file_problems)
def decodes(E, d: Data):
    return E.ExpectColumnValuesToBeNull(
        column="file_problem",
        description=f"Every file is one complete picture ({ACCEPTED}) that decodes: not "
                    "empty, not truncated, not corrupt, not animated nor multi-page, not "
                    "float pixels, not another kind of file.")


def _sizes(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    sizes = table.set_index("path")
    return [f"{sizes.source[r['path']]} ({int(sizes.width[r['path']])}x"
            f"{int(sizes.height[r['path']])} px)" for r in res["unexpected_index_list"]]


@CHECKS.check("wrong_size", "image size far from image.preprocess.image_size", name=_sizes)
def size(E, d: Data):
    size, rules = d.params.image.preprocess.image_size, d.params.image.validate
    if rules.allow_resize:
        size_rule = (f"Every image side is within {rules.max_resize_factor:g}x of "
                     f"image.preprocess.image_size {size} px, smaller or larger "
                     "(params image.validate.max_resize_factor).")
        max_factor = rules.max_resize_factor
    else:
        size_rule = (f"Every image is already {size}x{size} px "
                     "(params image.validate.allow_resize is false).")
        max_factor = 1.0
    return E.ExpectColumnValuesToBeBetween(column="resize_factor", min_value=1.0,
                                           max_value=max_factor, description=size_rule)


def _blank(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    source = dict(zip(table.path, table.source))
    return [f"{res['unexpected_percent']:.1f}% blank"] + [
        source[r["path"]] for r in res["unexpected_index_list"]]


@CHECKS.check("blank_images", "too many blank images", table="data_set", name=_blank)
def not_blank(E, d: Data):
    share = d.params.image.validate.max_blank_fraction
    # mostly: GX passes while at least this share of rows is not blank.
    return E.ExpectColumnValuesToBeInSet(
        column="blank", value_set=[False], mostly=1 - share,
        description=f"At most {share:.1%} of the images are blank (one value in every pixel) "
                    "(params image.validate.max_blank_fraction).")


def metrics(table: pd.DataFrame, params: Params) -> dict:
    """What validate's metrics hold for images besides the shared counts."""
    decoded = table[table.file_problem.isna()]
    channels = params.image.preprocess.channels
    return {
        "images": len(table),
        "undecodable": int(table.file_problem.notna().sum()),
        "duplicates": int(decoded.duplicated(KEY).sum()),
        # PIL's format name -> decoded images in it (MPO: a camera JPEG read as its main picture)
        "formats": counted(decoded["format"]),
        # original mode -> images converted from it to image.preprocess.channels (its PIL mode)
        "converted": counted(decoded["mode"][decoded["mode"] != MODES[channels]]),
        "channels_model": channels,
        "file_problems": {p.replace(" ", "_").replace("/", "_"):
                          int((table.file_problem == p).sum()) for p in FILE_PROBLEMS},
    }


def lines(metrics: dict, params: Params) -> list[str]:
    """What validate prints besides its summary: the images decoded per format; how many were
    converted, by mode."""
    found = []
    if metrics["formats"]:
        found.append("decoded images by format: " + ", ".join(
            f"{fmt} {n}" for fmt, n in metrics["formats"].items()))
    if metrics["converted"]:
        found.append(f"{sum(metrics['converted'].values())} images converted to "
                     f"{MODES[metrics['channels_model']]} (image.preprocess.channels "
                     f"{metrics['channels_model']}), by "
                     "original mode: " + ", ".join(f"{mode} {n}" for mode, n in
                                                   metrics["converted"].items()))
    return found
