"""The ingested data set as every stage reads it: manifest, class list, splits, data hash.

The ingest stage writes a folder of
    images/<split>/<class>/<file>   the images (PNG/JPEG), or with data.modality text
    texts/<split>/<class>/<file>    one document per file, the bytes as they came (UTF-8 expected)
    manifest.csv                    path (relative to the folder), label, split, and source: the
                                    file it came from, for error messages
    classes.json                    the class names; a label's index is its position here
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline import StageError

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ["path", "label", "split", "source"]


def read_manifest(folder: Path) -> tuple[list[dict], list[str]]:
    """The rows of folder/manifest.csv and the class names of folder/classes.json."""
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    return rows, classes


def write_manifest(folder: Path, rows: list[dict], classes: list[str]) -> None:
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "classes.json").write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")


def load_split(folder: Path, split: str, prep) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split through `prep`'s load: an image Preprocessing's uint8 (N, C, S, S)
    pixels, an AudioPreprocessing's float32 (N, samples) waveforms; and int64 labels."""
    rows, classes = read_manifest(folder)
    index = {c: i for i, c in enumerate(classes)}
    rows = [r for r in rows if r["split"] == split]
    if not rows:
        raise StageError(f"{folder / 'manifest.csv'}: no {prep.UNIT} in split {split!r}")
    pixels = np.stack([prep.load(folder / r["path"]) for r in rows])
    return pixels, np.array([index[r["label"]] for r in rows], dtype=np.int64)


def load_texts(folder: Path, split: str) -> tuple[list[str], np.ndarray]:
    """One split of an ingested text data set (data.modality text): the texts, decoded as UTF-8
    (validate has checked they decode), and int64 labels."""
    rows, classes = read_manifest(folder)
    index = {c: i for i, c in enumerate(classes)}
    rows = [r for r in rows if r["split"] == split]
    if not rows:
        raise StageError(f"{folder / 'manifest.csv'}: no texts in split {split!r}")
    texts = [(folder / r["path"]).read_bytes().decode("utf-8") for r in rows]
    return texts, np.array([index[r["label"]] for r in rows], dtype=np.int64)


def data_hash(folder: Path) -> str:
    """sha256 over the manifest and every image it lists, in manifest order."""
    digest = hashlib.sha256((folder / "manifest.csv").read_bytes())
    for row in read_manifest(folder)[0]:
        digest.update((folder / row["path"]).read_bytes())
    return digest.hexdigest()
