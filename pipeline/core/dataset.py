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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import StageError
from pipeline.core.executor import map_items

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


@dataclass(frozen=True)
class Items:
    """One split of an ingested data set as stages read it: a known length and class list, the
    labels, and the items in batches, in manifest order, read by the executor
    (pipeline/core/executor.py: in parallel). The folder of files is this seam's one
    implementation; a consumer that iterates `batches` holds one batch, not the split."""
    folder: Path
    split: str
    rows: list[dict]                 # the split's manifest rows, in manifest order
    classes: list[str]               # the data set's class names; a label is an index into them
    read: Callable[[Path], object]   # one item's file -> the item (an array, a text); pickles

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> np.ndarray:
        """The split's int64 labels, in manifest order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r["label"]] for r in self.rows], dtype=np.int64)

    def batches(self, size: int) -> Iterator[tuple[list | np.ndarray, np.ndarray]]:
        """(items, int64 labels) of at most `size` items each, in manifest order; array items
        (pixels, waveforms) stacked into one array, others (texts) a list."""
        labels = self.labels()
        for start in range(0, len(self.rows), size):
            rows = self.rows[start:start + size]
            items = map_items(self.read, [self.folder / r["path"] for r in rows])
            if isinstance(items[0], np.ndarray):
                items = np.stack(items)
            yield items, labels[start:start + size]

    def batch_outputs(self, size: int, fn: Callable) -> np.ndarray:
        """fn(items) of every batch, concatenated: one output row per item (logits, features),
        holding one batch of items at a time."""
        return np.concatenate([fn(items) for items, _ in self.batches(size)])


def split_items(folder: Path, split: str, read: Callable[[Path], object], unit: str) -> Items:
    """The items of one split of the ingested `folder`; a split without any is an error naming
    the manifest and the `unit` ("images", "texts", "clips")."""
    rows, classes = read_manifest(folder)
    rows = [r for r in rows if r["split"] == split]
    if not rows:
        raise StageError(f"{folder / 'manifest.csv'}: no {unit} in split {split!r}")
    return Items(Path(folder), split, rows, classes, read)


def split_of(folder: Path, split: str, prep) -> Items:
    """One split as a model with the preprocessing record `prep` reads it (prep.load: an image
    Preprocessing's uint8 (C, S, S) pixels, an AudioPreprocessing's float32 waveform, a
    TextPreprocessing's text), the stream evaluate and package score."""
    return split_items(folder, split, prep.load, prep.UNIT)


def load_split(folder: Path, split: str, prep) -> tuple[np.ndarray, np.ndarray]:
    """Decode one whole split through `prep`'s load: an image Preprocessing's uint8 (N, C, S,
    S) pixels, an AudioPreprocessing's float32 (N, samples) waveforms; and int64 labels. For
    the training side, which holds its split in memory (on the device) until it streams."""
    items = split_of(folder, split, prep)
    return next(items.batches(len(items)))


def read_text(path: Path) -> str:
    """One ingested text, decoded as UTF-8 (validate has checked that it decodes)."""
    return path.read_bytes().decode("utf-8")


def load_texts(folder: Path, split: str) -> tuple[list[str], np.ndarray]:
    """One whole split of an ingested text data set (data.modality text): the texts and int64
    labels."""
    items = split_items(folder, split, read_text, "texts")
    return next(items.batches(len(items)))


def data_hash(folder: Path) -> str:
    """sha256 over the manifest and every image it lists, in manifest order."""
    digest = hashlib.sha256((folder / "manifest.csv").read_bytes())
    for row in read_manifest(folder)[0]:
        digest.update((folder / row["path"]).read_bytes())
    return digest.hexdigest()
