"""Ingested data sets for tests: pipeline/core/dataset.py shards written from files a test made
(pack) or from items it holds, read back whole (items_of), and described whole as validate
describes them (described)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.core.dataset import SPLITS, item_batches, read_manifest, shard_files, write_items


def pack(folder: Path, rows: list[dict], classes: list[str], **sizes) -> None:
    """The files under `folder` that `rows` name (path, label, split, source) as the ingested
    data set in `folder`, each item's id its path."""
    write_items(folder, ((dict(r, id=r["path"]), (Path(folder) / r["path"]).read_bytes())
                         for r in rows), classes, **sizes)


def items_of(folder: Path, split: str | None = None) -> list[tuple[dict, bytes]]:
    """Every (row, bytes) of the ingested `folder` (of one split), in read order."""
    return [item for rows, data in item_batches(folder, [split] if split else SPLITS, 1 << 16)
            for item in zip(rows, data)]


def rewrite(folder: Path, items: list[tuple[dict, bytes]], classes: list[str] | None = None
            ) -> None:
    """Replace the ingested `folder`'s items (and classes) with `items`."""
    classes = classes if classes is not None else read_manifest(folder)[1]
    with tempfile.TemporaryDirectory() as tmp:
        write_items(Path(tmp), items, classes)
        shutil.rmtree(Path(folder) / "shards")
        shutil.copytree(Path(tmp) / "shards", Path(folder) / "shards")
        shutil.copyfile(Path(tmp) / "manifest.json", Path(folder) / "manifest.json")


def described(folder: Path, checks, params):
    """(Every shard's table of a modality's checks part, concatenated; their extras): what
    validate's data_set table and profile are made of, with every column."""
    import pandas as pd

    made = [checks.shard_table(shard, params) for split in SPLITS
            for shard in shard_files(folder, split)]
    return pd.concat([table for table, _ in made], ignore_index=True), [e for _, e in made]


def train_profile(folder: Path, checks, params) -> dict:
    """The data profile validate writes for the ingested `folder`."""
    return checks.conclude(*described(folder, checks, params), params, None)[0]
