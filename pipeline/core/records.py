"""Sources of records, read as streams into the ingested shards, for every modality: the files
data tools export besides a folder of class folders.

    Parquet     a .parquet file, or a folder holding .parquet files (any depth: a Hugging Face
                dataset's `data/train-00000-of-00002.parquet`, Spark's part files, DuckDB's
                COPY): one row per item. The item column is binary (a file's bytes), a struct
                with a `bytes` field (what `datasets` writes for its Image and Audio features)
                or a string (a text); the label a string or an integer (`datasets`' ClassLabel
                integers are named by the class names its schema metadata records)
    WebDataset  a .tar file, or a folder holding .tar shards: members grouped into items by the
                key before the first dot of their name (`0001.png`, `0001.cls`), as WebDataset
                writes them; the item is the member with a data suffix of the modality, the label
                a `.cls` member (text) or the label field of a `.json` member

Columns (and a .json member's fields) are named by the shared ingest.item_column (null: the one
named like the modality's item, `image`, `text`, `audio`, or else the only other bytes or string
column), ingest.label_column and ingest.split_column (optional). Where a record gives no split,
its file's name or folder may (`train`, `val` or `validation`, `test` before the first `-`, `_`
or `.`: Hugging Face's file names); with neither, data.split applies, stratified and seeded
(pipeline/core/folders.py). Every record gives a split or none does.

A source is read twice as a stream, never whole: once for labels and splits (Parquet reads only
those two columns), once for the items, which go to the shards as they come, each with the id
<top>/<split>/<label>/<n><suffix> (n its position in the source; the suffix its own member or
path name's) and a source naming the file and row or member: the name validate's messages give.
The text modality's JSON Lines and CSV files come through write_records too
(pipeline/modalities/text/sources.py).

Why not the `webdataset` package: tarfile reads a tar member by member, and grouping by key is
a few lines; the package adds its pipeline machinery for that one function.
"""
from __future__ import annotations

import json
import re
import tarfile
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import StageError
from pipeline.core.dataset import SPLITS, ShardWriter
from pipeline.core.folders import FileKind, is_system, stratified_split
from pipeline.params import Params, Split

# Parquet rows converted to Python at a time: with the row group pyarrow decodes, what a read
# holds (`datasets` writes image and audio row groups of 100 rows)
BATCH_ROWS = 64


@dataclass(frozen=True)
class Record:
    """One item of a source: its bytes, class, split (None: the source gives none), where it
    is (for messages and the item's `source`) and the suffix of its own name ('' for none)."""
    data: bytes
    label: str
    split: str | None
    source: str
    suffix: str


@dataclass(frozen=True)
class Columns:
    """ingest.item_column (None: found by name or type), label_column, split_column."""
    item: str | None
    label: str
    split: str

    def key(self, name: str) -> str:
        """The params key that names column `name`, for messages."""
        return {self.item: "ingest.item_column", self.label: "ingest.label_column",
                self.split: "ingest.split_column"}[name]


def label_of(value, where: str, name: str) -> str:
    """A record's label (its column `name`) as a class name: a string or an integer, NFC with
    outer blanks removed, usable as a folder name in an item id."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise StageError(f"{where}: `{name}` must be a string or an integer, got {value!r}")
    label = unicodedata.normalize("NFC", str(value)).strip()
    if not label or label in (".", "..") or "/" in label or "\0" in label:
        raise StageError(f"{where}: label {value!r} cannot name a class (blank, '.', '..', or "
                         "holds '/' or NUL)")
    return label


def split_of(value, where: str, name: str) -> str | None:
    """A record's split field: one of SPLITS ('validation' is val), or None when absent."""
    if value is None or value == "":
        return None
    split = {"validation": "val"}.get(value, value)
    if split not in SPLITS:
        raise StageError(f"{where}: `{name}` must be one of {', '.join(SPLITS)}, got {value!r}")
    return SPLITS[SPLITS.index(split)]  # the one string object, not the row's


def split_in_name(path: Path, root: Path) -> str | None:
    """The split a file's path below `root` names (its folders', then its own name's first
    word: `train-00000-of-00002.parquet`, `val/0.tar`), else None."""
    for part in (*path.relative_to(root).parent.parts, path.name):
        word = re.split(r"[-_.]", part, maxsplit=1)[0].lower()
        if (split := {"validation": "val", "valid": "val"}.get(word, word)) in SPLITS:
            return split
    return None


# ---- Parquet ---------------------------------------------------------------------------------

def _class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The class names `datasets` records for a ClassLabel column in the schema metadata."""
    try:
        info = json.loads((schema.metadata or {})[b"huggingface"])
        feature = info["info"]["features"][column]
        return list(feature["names"]) if feature.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError):
        return None


def _is_item_type(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))


def item_column(schema: pa.Schema, columns: Columns, own: str, where: str) -> str:
    """The column holding the items: ingest.item_column, else one named `own` (the modality's
    item: image, text, audio), else the only bytes, string or {bytes} column left."""
    names = schema.names
    if columns.label not in names:
        raise StageError(f"{where}: no `{columns.label}` column (ingest.label_column); it has "
                         + ", ".join(f"`{n}`" for n in names))
    if columns.item is not None:
        if columns.item not in names:
            raise StageError(f"{where}: no `{columns.item}` column (ingest.item_column); it has "
                             + ", ".join(f"`{n}`" for n in names))
        return columns.item
    if own in names:
        return own
    found = [f.name for f in schema if f.name not in (columns.label, columns.split)
             and _is_item_type(f.type)]
    if len(found) != 1:
        raise StageError(f"{where}: {'no' if not found else 'more than one'} column could hold "
                         f"the items (bytes, string, or a struct with `bytes`)"
                         f"{': ' + ', '.join(f'`{n}`' for n in found) if found else ''}; "
                         "name it in ingest.item_column")
    return found[0]


def _item_bytes(value, where: str, column: str) -> tuple[bytes, str]:
    """(bytes, suffix of its own path) of one item cell."""
    if isinstance(value, dict):  # datasets' Image/Audio: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            raise StageError(f"{where}: `{column}` holds no bytes"
                             + (f", only the path {path!r}, which is not read" if path else ""))
        return data, Path(path).suffix.lower() if path else ""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass"), ""
    if value is None:
        raise StageError(f"{where}: `{column}` is empty")
    return value, ""


def files_below(root: Path, suffix: str) -> list[Path]:
    """`root` if it is a file, else its files named *<suffix> at any depth, hidden and system
    entries skipped, in path order."""
    return [root] if root.is_file() else sorted(
        p for p in root.rglob(f"*{suffix}")
        if p.is_file() and not any(is_system(Path(q)) for q in p.relative_to(root).parts))


def parquet_records(root: Path, columns: Columns, own: str, labels_only: bool = False
                    ) -> Iterator[Record]:
    """Each row of the Parquet file or folder `root` as a Record (with labels_only, data b'':
    only the label and split columns are read)."""
    for file in files_below(root, ".parquet"):
        shown = file.name if file == root else file.relative_to(root).as_posix()
        where = f"{root}: {shown}" if file != root else str(root)
        try:
            reader = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as e:
            raise StageError(f"{where}: not a readable Parquet file ({e})") from None
        schema = reader.schema_arrow
        item = item_column(schema, columns, own, where)
        names = _class_names(schema, columns.label)
        has_split = columns.split in schema.names
        wanted = [columns.label] + ([columns.split] if has_split else []) + \
            ([] if labels_only else [item])
        named_split = split_in_name(file, root) if file != root else None
        row = 0
        # A row group at a time: over the whole file, iter_batches kept every batch it had read
        # (the 91 MB file of 100,000 images: 92 MB held; per row group: 3 MB)
        for batch in (b for g in range(reader.num_row_groups) for b in reader.iter_batches(
                batch_size=BATCH_ROWS, row_groups=[g], columns=wanted)):
            cells = batch.to_pydict()
            for k in range(batch.num_rows):
                at = f"{where}: row {row}"
                value = cells[columns.label][k]
                if names is not None and isinstance(value, int) and 0 <= value < len(names):
                    value = names[value]
                label = label_of(value, at, columns.label)
                split = split_of(cells[columns.split][k], at, columns.split) if has_split \
                    else named_split
                data, suffix = (b"", "") if labels_only else _item_bytes(cells[item][k], at, item)
                yield Record(data, label, split, f"{shown}:row {row}", suffix)
                row += 1


# ---- WebDataset ------------------------------------------------------------------------------

def _samples(file: Path, where: str, read: Callable[[str], bool]
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of each sample of a tar, members read in order, grouped by key;
    the bytes of a member whose suffix `read` refuses are not read (b'')."""
    key, members = None, {}
    try:
        with tarfile.open(file, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                if name.startswith("."):
                    continue
                stem, dot, suffix = name.partition(".")
                this = f"{folder}/{stem}" if folder else stem
                if this != key and key is not None:
                    yield key, members
                    members = {}
                key = this
                suffix = "." + suffix.lower() if dot else ""
                members[suffix] = tar.extractfile(member).read() if read(suffix) else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise StageError(f"{where}: not a readable tar file ({e})") from None
    if key is not None:
        yield key, members


def tar_records(root: Path, columns: Columns, kind: FileKind, labels_only: bool = False
                ) -> Iterator[Record]:
    """Each sample of the WebDataset shard or folder of shards `root` as a Record."""
    for file in files_below(root, ".tar"):
        shown = file.name if file == root else file.relative_to(root).as_posix()
        where = f"{root}: {shown}" if file != root else str(root)
        named_split = split_in_name(file, root) if file != root else None
        # the labels pass reads the label members only
        for key, members in _samples(file, where, lambda suffix: not labels_only or
                                     suffix in (".cls", ".json")):
            at = f"{where}: {key}"
            data = [s for s in members if s in kind.suffixes]
            if len(data) != 1:
                raise StageError(f"{at}: {'no member' if not data else 'more than one member'} "
                                 f"named like {kind.many} ({' '.join(sorted(kind.suffixes))})"
                                 f"; it has {', '.join(key + s for s in members)}")
            fields = {}
            if ".json" in members:
                try:
                    fields = json.loads(members[".json"])
                except ValueError as e:
                    raise StageError(f"{at}.json: not valid JSON ({e})") from None
            if ".cls" in members:
                fields[columns.label] = members[".cls"].decode("utf-8", "replace").strip()
                if fields[columns.label].isdigit():
                    fields[columns.label] = int(fields[columns.label])
            if fields.get(columns.label) is None:
                raise StageError(f"{at}: no label (a {key}.cls member, or a `{columns.label}` "
                                 f"field, ingest.label_column, in {key}.json)")
            label = label_of(fields[columns.label], at, columns.label)
            split = split_of(fields.get(columns.split), at, columns.split) or named_split
            yield Record(b"" if labels_only else members[data[0]], label, split,
                         f"{shown}:{key}{data[0]}", data[0])


# ---- into the shards -------------------------------------------------------------------------

def write_records(read: Callable[[bool], Iterator[Record]], out: ShardWriter, top: str,
                  split: Split, seed: int, max_file_bytes: int, where: str) -> list[str]:
    """Add every record of `read(labels_only)` to the shards `out` as <top>/<split>/<label>/<n>
    <suffix>; the class names. The first pass reads labels and splits (the stratified split needs
    every label first), the second the items. A source without records, or items over
    max_file_bytes, fail the stage, named; `where` starts messages (the params key and the
    source)."""
    labels, given = [], []
    first = None
    names: dict[str, str] = {}  # one string object per class: a row's own copy is 50 bytes
    for r in read(True):
        if first is None:
            first = r
        elif (r.split is None) != (first.split is None):
            raise StageError(f"{where}: {r.source} has {'a' if r.split else 'no'} split, unlike "
                             f"{first.source} (give every record a split, or none)")
        labels.append(names.setdefault(r.label, r.label))
        given.append(r.split)
    if first is None:
        raise StageError(f"{where}: holds no records")
    splits = given if first.split is not None else \
        stratified_split(labels, split, seed)
    width = len(str(len(labels)))
    n = 0
    for n, r in enumerate(read(False)):
        if len(r.data) > max_file_bytes:
            raise StageError(f"{where}: {r.source}: {len(r.data)} bytes, over "
                             f"ingest.max_file_bytes {max_file_bytes}")
        out.add(f"{top}/{splits[n]}/{labels[n]}/{n:0{width}d}{r.suffix}", labels[n], splits[n],
                r.source, r.data)
    if n + 1 != len(labels):
        raise StageError(f"{where}: the source changed while it was read ({len(labels)} records, "
                         f"then {n + 1})")
    return sorted(set(labels))


def reader(root: Path, columns: Columns, kind: FileKind, own: str
           ) -> Callable[[bool], Iterator[Record]] | None:
    """The record reader of a Parquet or WebDataset source at `root`, None when it is neither
    (a class folder, or no such path)."""
    def holds(suffix: str) -> bool:  # a file, or one in the folder or a folder below (not deeper:
        # a class folder of a million images is listed once, by the ingest that takes it)
        return root.suffix.lower() == suffix if root.is_file() else root.is_dir() and any(
            next(iter(root.glob(pattern)), None) for pattern in (f"*{suffix}", f"*/*{suffix}"))

    if holds(".parquet"):
        return lambda labels_only: parquet_records(root, columns, own, labels_only)
    if holds(".tar"):
        return lambda labels_only: tar_records(root, columns, kind, labels_only)
    return None


def columns_of(params: Params) -> Columns:
    i = params.ingest
    return Columns(i.item_column, i.label_column, i.split_column)


def ingest_records(params: Params, source: str, out: ShardWriter, top: str, kind: FileKind,
                   own: str, key: str) -> list[str] | None:
    """When `source` (params `key`) is a Parquet or WebDataset source: its records added to the
    shards `out` as <top>/..., and the class names; else None. `own`: the item column's usual
    name for the modality (image, text, audio)."""
    read = reader(Path(source), columns_of(params), kind, own)
    if read is None:
        return None
    return write_records(read, out, top, params.data.split, params.data.seed,
                         params.ingest.max_file_bytes, f"{key} {source}")
