"""Ingested data sets for tests: pipeline/core/dataset.py shards written from files a test made
(pack) or from items it holds, and read back whole (items_of)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.core.dataset import SPLITS, item_batches, read_manifest, write_items


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
