"""The ingested data set as every stage reads it: items in Parquet shards, a manifest, splits.

The ingest stage writes a folder of
    shards/<split>/part-00000.parquet  one row per item: id, label, split, source, sha256, bytes
    manifest.json                      the class names (a label's index is its position there)
                                       and, per split, its shard files and item count

An item's `id` is its path in the data set (images/<split>/<class>/<name>: unique, and what a
message names when the source is not a file), `source` where it came from (the file relative to
the source folder, "sklearn digits[12]"), `bytes` the file as it came (a PNG, a UTF-8 text, a WAV)
and `sha256` their digest. Rows keep the order the source gave them (class folders and files
sorted), each split on its own, so a stage reads one split without touching the others.

A shard ends after an item whose id hashes to a cut (about every ingest.shard_items items, at
least half that many, at most twice): boundaries move with the items, not with their count, so
items added to a source change only the shards they land in (and the files after them keep
their bytes: `dvc push` sends what is new). Row groups hold at most ingest.row_group_bytes of
items, the most a reader holds at once. The same items give the same bytes.

Stages read a split as Items: its rows (no bytes) and its items decoded in batches, one batch
held at a time, through the executor (pipeline/core/executor.py: in parallel).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import StageError
from pipeline.core.executor import map_items, span

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
ROW_FIELDS = ("id", "label", "split", "source")  # a row without its bytes, as stages see it
SCHEMA = pa.schema([("id", pa.string()), ("label", pa.string()), ("split", pa.string()),
                    ("source", pa.string()), ("sha256", pa.string()), ("bytes", pa.binary())])
# Fixed writer options: the same rows give the same file bytes (pyarrow writes no timestamp).
WRITER = {"compression": "zstd", "write_statistics": ["id", "label", "split"],
          "store_schema": False}


def shard_cut(item_id: str, held: int, shard_items: int) -> bool:
    """Whether a shard holding `held` items ends after the item `item_id`: at twice shard_items,
    and from half of it on where the id's hash says so (on average every shard_items / 2)."""
    if held >= 2 * shard_items:
        return True
    draw = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "little")
    return held >= max(1, shard_items // 2) and draw % shard_items < 2


@dataclass
class _Shards:
    """One split's shard files as they are written."""
    folder: Path
    rows: list[dict] = field(default_factory=list)  # the open row group's rows
    held: int = 0          # items in the open shard
    buffered: int = 0      # bytes in the open row group
    writer: pq.ParquetWriter | None = None
    files: list[str] = field(default_factory=list)
    items: int = 0


class ShardWriter:
    """Items added one at a time (id, label, split, source, bytes) into out/shards/<split>/,
    holding at most one row group per split; close() writes manifest.json. Used as a context
    manager by the sources parts (pipeline/modalities/<modality>/sources.py)."""

    def __init__(self, out: Path, shard_items: int, row_group_bytes: int):
        self.out, self.shard_items, self.row_group_bytes = Path(out), shard_items, row_group_bytes
        self.splits = {s: _Shards(self.out / "shards" / s) for s in SPLITS}
        # Ids are not kept: validate's repeated-rows check names an id given twice, and a
        # million ids would cost ~100 MB here.

    @property
    def items(self) -> int:
        """Items added so far."""
        return sum(shards.items for shards in self.splits.values())

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        for shards in self.splits.values():  # a failed ingest leaves no open file behind
            if shards.writer is not None:
                shards.writer.close()

    def add(self, item_id: str, label: str, split: str, source: str, data: bytes) -> None:
        if split not in self.splits:
            raise StageError(f"{source}: split {split!r} is not one of {', '.join(SPLITS)}")
        shards = self.splits[split]
        shards.rows.append({"id": item_id, "label": label, "split": split, "source": source,
                            "sha256": hashlib.sha256(data).hexdigest(), "bytes": data})
        shards.held, shards.buffered, shards.items = (shards.held + 1, shards.buffered + len(data),
                                                      shards.items + 1)
        if shard_cut(item_id, shards.held, self.shard_items):
            self._flush(shards, end=True)
        elif shards.buffered >= self.row_group_bytes:
            self._flush(shards, end=False)

    def _flush(self, shards: _Shards, end: bool) -> None:
        if shards.rows:
            if shards.writer is None:
                shards.folder.mkdir(parents=True, exist_ok=True)
                name = f"part-{len(shards.files):05d}.parquet"
                shards.files.append(name)
                shards.writer = pq.ParquetWriter(shards.folder / name, SCHEMA, **WRITER)
            shards.writer.write_table(pa.Table.from_pylist(shards.rows, SCHEMA),
                                      row_group_size=len(shards.rows))
            shards.rows, shards.buffered = [], 0
        if end and shards.writer is not None:
            shards.writer.close()
            shards.writer, shards.held = None, 0

    def close(self, classes: list[str]) -> dict[str, int]:
        """Finish every split's last shard and write manifest.json; the item count per split."""
        for shards in self.splits.values():
            self._flush(shards, end=True)
        manifest = {"classes": classes,
                    "splits": {s: {"items": sh.items, "shards": sh.files}
                               for s, sh in self.splits.items()}}
        (self.out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        return {s: sh.items for s, sh in self.splits.items()}


def write_items(out: Path, items: Iterable[tuple[dict, bytes]], classes: list[str],
                shard_items: int = 1 << 30, row_group_bytes: int = 1 << 26) -> dict[str, int]:
    """A data set of (row, bytes) items (row: id, label, split, source) written at once: for
    code that builds one from items it holds (tests, benchmarks). One shard per split unless
    told otherwise (the ingest stage passes params.yaml's sizes)."""
    with ShardWriter(out, shard_items, row_group_bytes) as writer:
        for row, data in items:
            writer.add(row["id"], row["label"], row["split"], row.get("source") or row["id"], data)
        return writer.close(classes)


def read_json_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run the ingest stage first)") from None


def shard_files(folder: Path, split: str) -> list[Path]:
    """The shard files of one split, in order."""
    manifest = read_json_manifest(folder)
    return [Path(folder, "shards", split, name) for name in manifest["splits"][split]["shards"]]


def _columns(folder: Path, splits: Iterable[str], columns: list[str], size: int
             ) -> Iterator[pa.RecordBatch]:
    for split in splits:
        yield from _shard_columns(shard_files(folder, split), columns, size)


def _shard_columns(paths: Iterable[Path], columns: list[str], size: int
                   ) -> Iterator[pa.RecordBatch]:
    for path in paths:
        shard = pq.ParquetFile(path)
        # A row group at a time: iter_batches over a whole file keeps every batch it has
        # read until the file ends (a shard of 50,000 photos of 20 KB: 1 GB held)
        for group in range(shard.num_row_groups):
            yield from shard.iter_batches(batch_size=size, columns=columns, row_groups=[group])


def read_manifest(folder: Path) -> tuple[list[dict], list[str]]:
    """Every item's row (id, label, split, source; no bytes), split by split in shard order, and
    the class names."""
    classes = read_json_manifest(folder)["classes"]
    rows = [row for batch in _columns(folder, SPLITS, list(ROW_FIELDS), 1 << 16)
            for row in batch.to_pylist()]
    return rows, classes


def item_batches(folder: Path, splits: Iterable[str], size: int
                 ) -> Iterator[tuple[list[dict], list[bytes]]]:
    """(rows, bytes) of at most `size` items each, split by split in shard order: what a pass
    over the items holds at once."""
    return _rows_and_bytes(_columns(folder, splits, [*ROW_FIELDS, "bytes"], size), size)


def _rows_and_bytes(batches: Iterable[pa.RecordBatch], size: int
                    ) -> Iterator[tuple[list[dict], list[bytes]]]:
    rows, data = [], []
    for batch in batches:
        table = batch.to_pydict()
        data.extend(table.pop("bytes"))
        rows.extend(dict(zip(table, values)) for values in zip(*table.values()))
        while len(rows) >= size:
            yield rows[:size], data[:size]
            rows, data = rows[size:], data[size:]
    if rows:
        yield rows, data


def described_table(shard: Path | None, fn: Callable, columns: list[str], named: bool = False,
                    extra: Callable[[dict, object], None] | None = None):
    """A pandas DataFrame with `columns`, one row per item of one `shard` file (None: no file,
    no rows: the table of a data set without items), in its order:
    its path (the id), source, label and split, then fn(bytes)'s dict (named: fn((id, bytes))),
    described in parallel through the executor. With `extra`, fn returns (dict, more) and
    extra(row, more) sees each item's `more` here. Built a round of the executor's items at a
    time, a frame per round: no Python dict per item outlives its round, and a class or split
    name is one string object."""
    import pandas as pd

    names: dict[str, str] = {}
    frames = []
    size = span()
    shards = [] if shard is None else [shard]
    for rows, data in _rows_and_bytes(_shard_columns(shards, [*ROW_FIELDS, "bytes"], size), size):
        out = map_items(fn, list(zip((r["id"] for r in rows), data)) if named else data)
        if extra is not None:
            for row, (_, more) in zip(rows, out):
                extra(row, more)
            out = [described for described, _ in out]
        frames.append(pd.DataFrame.from_records(
            [{"path": r["id"], "source": r["source"],
              "label": names.setdefault(r["label"], r["label"]),
              "split": names.setdefault(r["split"], r["split"]), **d} for r, d in zip(rows, out)],
            columns=columns))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _chosen(pieces: Iterable, positions: np.ndarray, length: Callable[[object], int]
            ) -> Iterator[tuple[object, np.ndarray]]:
    """(piece, the sorted `positions` that fall in it, as indices into it) of each piece of a
    pass in order, `length(piece)` items each: what a pass picks out of the batches it reads."""
    start = 0
    for piece in pieces:
        n = length(piece)
        lo, hi = np.searchsorted(positions, [start, start + n])
        yield piece, positions[lo:hi] - start
        start += n


def named_rows(folder: Path, positions: np.ndarray) -> tuple[list[str], list[str]]:
    """(ids, sources) of the items at sorted `positions` of the whole data set (split by split
    in shard order, as validate's table holds them): the id and source columns alone."""
    ids, sources = [], []
    for batch, picked in _chosen(_columns(folder, SPLITS, ["id", "source"], 1 << 16), positions,
                                 len):
        ids.extend(batch.column(0).take(picked).to_pylist())
        sources.extend(batch.column(1).take(picked).to_pylist())
    return ids, sources


@dataclass(frozen=True)
class Items:
    """One split of an ingested data set as stages read it: a known length, class list and
    labels (the shards' label column alone: 8 bytes an item), and the items in batches, in
    shard order, decoded by the executor (pipeline/core/executor.py: in parallel). A consumer
    that iterates `batches` holds one batch, not the split."""
    folder: Path
    split: str
    classes: list[str]                # the data set's class names; a label is an index into them
    read: Callable[[bytes], object]   # one item's bytes -> the item (an array, a text); pickles
    label_index: np.ndarray           # int64 label of every item, in shard order

    def __len__(self) -> int:
        return len(self.label_index)

    def labels(self) -> np.ndarray:
        """The split's int64 labels, in shard order."""
        return self.label_index

    def batches(self, size: int) -> Iterator[tuple[list | np.ndarray, np.ndarray]]:
        """(items, int64 labels) of at most `size` items each, in shard order; array items
        (pixels, waveforms) stacked into one array, others (texts) a list."""
        start = 0
        for _, data in item_batches(self.folder, [self.split], size):
            items = map_items(self.read, data)
            if isinstance(items[0], np.ndarray):
                items = np.stack(items)
            yield items, self.label_index[start:start + len(data)]
            start += len(data)

    def batch_outputs(self, size: int, fn: Callable) -> np.ndarray:
        """fn(items) of every batch, concatenated: one output row per item (logits, features),
        holding one batch of items at a time."""
        return np.concatenate([fn(items) for items, _ in self.batches(size)])

    def taken(self, indices: np.ndarray, size: int) -> Iterator[list | np.ndarray]:
        """The decoded items at sorted `indices`, in shard order, a batch of at most `size` read
        items at a time (only the chosen ones decoded; one batch held)."""
        for (_, data), picked in _chosen(item_batches(self.folder, [self.split], size), indices,
                                         lambda batch: len(batch[1])):
            if len(picked):
                items = map_items(self.read, [data[i] for i in picked])
                yield np.stack(items) if isinstance(items[0], np.ndarray) else items

    def take(self, indices: np.ndarray) -> tuple[list[dict], list[bytes], list | np.ndarray]:
        """The rows (id, label, split, source), stored bytes (each file as it came: what a
        client sends) and decoded items of the items at sorted `indices`, read shard by shard."""
        rows, found = stored(self.folder, self.split, indices)
        items = map_items(self.read, found)
        if items and isinstance(items[0], np.ndarray):
            items = np.stack(items)
        return rows, found, items


def stored(folder: Path, split: str, indices: np.ndarray) -> tuple[list[dict], list[bytes]]:
    """The rows (id, label, split, source) and stored bytes of the split's items at sorted
    `indices` (positions in shard order), read a round at a time."""
    rows, found = [], []
    for (batch_rows, data), picked in _chosen(item_batches(folder, [split], span()), indices,
                                              lambda batch: len(batch[1])):
        rows.extend(batch_rows[i] for i in picked)
        found.extend(data[i] for i in picked)
    return rows, found


def sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `limit` of n items, drawn with `seed`; all n when n <= limit."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def classes_of(folder: Path) -> list[str]:
    """The data set's class names (manifest.json alone)."""
    return read_json_manifest(folder)["classes"]


def split_labels(folder: Path, split: str) -> np.ndarray:
    """int64 labels of one split, in shard order: its shards' label column alone."""
    index = {c: i for i, c in enumerate(classes_of(folder))}
    return np.array([index[label] for batch in _columns(folder, [split], ["label"], 1 << 16)
                     for label in batch.column(0).to_pylist()], dtype=np.int64)


def split_items(folder: Path, split: str, read: Callable[[bytes], object], unit: str) -> Items:
    """The items of one split of the ingested `folder`; a split without any is an error naming
    the manifest and the `unit` ("images", "texts", "clips")."""
    labels = split_labels(folder, split)
    if not len(labels):
        raise StageError(f"{Path(folder) / MANIFEST}: no {unit} in split {split!r}")
    return Items(Path(folder), split, classes_of(folder), read, labels)


def split_of(folder: Path, split: str, prep) -> Items:
    """One split as a model with the preprocessing record `prep` reads it (prep.load of an
    item's bytes: an image Preprocessing's uint8 (C, S, S) pixels, an AudioPreprocessing's
    float32 waveform, a TextPreprocessing's text), the stream evaluate and package score."""
    return split_items(folder, split, prep.load, prep.UNIT)


def load_split(folder: Path, split: str, prep) -> tuple[np.ndarray, np.ndarray]:
    """Decode one whole split through `prep`'s load: an image Preprocessing's uint8 (N, C, S,
    S) pixels, an AudioPreprocessing's float32 (N, samples) waveforms; and int64 labels. For
    the training side, which holds its split in memory (on the device) until it streams."""
    items = split_of(folder, split, prep)
    return next(items.batches(len(items)))


def read_text(data: bytes) -> str:
    """One ingested text, decoded as UTF-8 (validate has checked that it decodes)."""
    return data.decode("utf-8")


def load_texts(folder: Path, split: str) -> tuple[list[str], np.ndarray]:
    """One whole split of an ingested text data set (data.modality text): the texts and int64
    labels."""
    items = split_items(folder, split, read_text, "texts")
    return next(items.batches(len(items)))


def data_hash(folder: Path) -> str:
    """sha256 over the manifest and every shard file, split by split in order."""
    digest = hashlib.sha256((Path(folder) / MANIFEST).read_bytes())
    for split in SPLITS:
        for path in shard_files(folder, split):
            with open(path, "rb") as f:  # a MiB at a time: a shard of photos is gigabytes
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def extract(folder: Path, split: str, out: Path, limit: int | None = None) -> int:
    """Write the first `limit` items (all: None) of one split as files out/<id>, their bytes as
    ingested (a PNG, a text, a WAV: what a client sends); the number written."""
    written = 0
    for rows, data in item_batches(folder, [split], 1024):
        for row, item in zip(rows, data):
            if limit is not None and written >= limit:
                return written
            path = Path(out, row["id"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(item)
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.core.dataset",
        description="Write a split's items of an ingested data set as files, named by their id")
    parser.add_argument("data", type=Path, help="the ingested folder (data/ingested)")
    parser.add_argument("split", choices=SPLITS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="at most this many items")
    args = parser.parse_args(argv)
    try:
        written = extract(args.data, args.split, args.out, args.limit)
    except StageError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{written} {args.split} items written under {args.out}")


if __name__ == "__main__":
    main()
