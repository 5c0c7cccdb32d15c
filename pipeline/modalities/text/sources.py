"""The text modality's `sources` part (pipeline/core/modality.py, called by the ingest stage): text
sources (text.ingest.source) read into the ingested layout of pipeline/core/dataset.py:
one document per item, with the id texts/<split>/<class>/<name>.txt.

    languages         built in: language identification from the dialogs that ship inside the
                      chatterbot-corpus wheel (no download), LANGUAGES, text.ingest.per_class each
    <folder>          one subfolder per class of .txt files, optionally pre-split into
                      train/ val/ test/ (scikit-learn's load_files layout; pipeline/core/folders.py:
                      hidden and system files skipped, what cannot be taken refused by name)
    <file>.jsonl      one JSON object per line with a text, a label and optionally a split
                      field (named by ingest.item_column, label_column and split_column:
                      `text`, `label`, `split` by default; other fields ignored)
    <file>.csv        a header naming those columns (other columns ignored); RFC 4180: fields
                      holding commas, quotes or line breaks are quoted
    <file>.tsv        the same, tab-separated, as IANA's text/tab-separated-values: no quoting,
                      one record per line, a quote is text (a text holding a tab or a line break
                      needs .csv or .jsonl)
    Parquet, .tar     a Parquet file or folder with a string column, or WebDataset shards of
                      .txt members (pipeline/core/records.py)

Every records source is read as a stream, twice (pipeline/core/records.py write_records): the
labels and splits first, then the texts, each added to the shards as it is read.
Files are stored byte for byte; a .jsonl/.csv/.tsv text is stored as its UTF-8 bytes, and bytes
that are not UTF-8 are carried through unchanged (surrogateescape), so the validate stage, which
decodes every text, names the line they came from. A record that does not parse, or lacks a
field, fails here, naming the file and line; a header without the text or label column fails
naming the file, the column, its params key and the columns the header has. Without a split
field the split is data.split, stratified and seeded like images (pipeline/core/folders.py); a
source gives a split to every record or to none.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from pipeline import StageError
from pipeline.core import records
from pipeline.core.dataset import ShardWriter
from pipeline.core.folders import FileKind, copy_folder
from pipeline.core.records import Columns, Record, label_of, split_of, write_records
from pipeline.params import Params, Split
from pipeline.modalities.text.words import text_key

TEXTS = FileKind(suffixes=frozenset({".txt"}), one="a .txt file", many=".txt files",
                 files=".txt files", other="non-.txt")
# The built-in set: the languages with at least 600 distinct dialog lines of their own in
# chatterbot-corpus 1.3.3 (Dutch, the smallest, keeps 621 once shared lines and repeats go),
# except traditionalchinese: Chinese in another script.
LANGUAGES = ("chinese", "dutch", "english", "italian", "japanese", "korean", "persian",
             "portuguese", "spanish", "ukrainian")


# A records file's suffix -> the delimiter of its columns (None: JSON Lines)
RECORD_FILES = {".jsonl": None, ".csv": ",", ".tsv": "\t"}


def source(params: Params) -> str:
    """text.ingest.source: where the texts come from."""
    return params.text.ingest.source


def ingest(params: Params, out: ShardWriter) -> list[str]:
    """Add the texts of text.ingest.source to the shards `out`; return the class names."""
    t, i = params.text.ingest, params.ingest
    return ingest_texts(t.source, out, params.data.split, params.data.seed, i.max_file_bytes,
                        t.per_class, Columns(i.item_column, i.label_column, i.split_column))


def ingest_texts(source: str, out: ShardWriter, split: Split, seed: int, max_file_bytes: int,
                 per_class: int, columns: Columns) -> list[str]:
    """Add the texts to the shards `out`; return the class names."""
    path = Path(source)
    suffix = path.suffix.lower()
    key = "text.ingest.source"
    where = f"{key} {source}"
    if source == "languages":
        texts = built_in_languages(per_class, seed)
        classes = write_records(lambda _: iter(texts), out, "texts", split, seed, max_file_bytes,
                                where)
    elif suffix in RECORD_FILES and path.is_file():
        delimiter = RECORD_FILES[suffix]
        read = (lambda _: read_jsonl(path, columns)) if delimiter is None else \
            (lambda _: read_delimited(path, columns, delimiter))
        classes = write_records(read, out, "texts", split, seed, max_file_bytes, where)
    elif (read := records.reader(path, columns, TEXTS, "text")) is not None:
        classes = write_records(read, out, "texts", split, seed, max_file_bytes, where)
    elif path.is_dir():
        classes = copy_folder(path, out, "texts", split, seed, max_file_bytes, TEXTS, key)
    else:
        raise StageError(f"{key} {source}: not a folder, a .jsonl, .csv, .tsv, .parquet or .tar "
                         "file (nor 'languages')")
    if not out.items:
        raise StageError(f"{key} {source}: holds no texts")
    return classes


def built_in_languages(per_class: int, seed: int) -> list[Record]:
    """Up to `per_class` dialog lines per language of LANGUAGES, each a text: blank lines, lines
    that two languages share (loan phrases, names, emoji) and repeats within a language (by
    pipeline/modalities/text/words.py text_key) left out, then a seeded choice, in a fixed order."""
    import numpy as np
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~5x faster
    lines: dict[str, dict[str, tuple[str, str]]] = {}  # language -> key -> (text, source)
    for language in LANGUAGES:
        found = lines.setdefault(language, {})
        for file in sorted((Path(DATA_DIRECTORY) / language).glob("*.yml")):
            dialogs = yaml.load(file.read_text(encoding="utf-8"), Loader=loader) or {}
            for i, dialog in enumerate(dialogs.get("conversations") or []):
                for j, text in enumerate(dialog):
                    if isinstance(text, str) and text.strip():
                        where = (f"chatterbot-corpus {language}/{file.name} conversation {i} "
                                 f"line {j}")
                        found.setdefault(text_key(text), (text, where))
    languages_of: dict[str, int] = {}
    for found in lines.values():
        for key in found:
            languages_of[key] = languages_of.get(key, 0) + 1
    rng = np.random.default_rng(seed)
    records = []
    for language in LANGUAGES:
        own = [v for k, v in lines[language].items() if languages_of[k] == 1]
        chosen = sorted(rng.permutation(len(own))[:per_class])
        records += [Record(own[i][0].encode("utf-8"), language, None, own[i][1], ".txt")
                    for i in chosen]
    return records


def text_field(names, columns: Columns) -> str:
    """The field or column holding the text: ingest.item_column, else `text`, else the only one
    besides the label and split."""
    if columns.item is not None:
        return columns.item
    others = [n for n in names if n not in (columns.label, columns.split)]
    if "text" in names or len(others) != 1:
        return "text"
    return others[0]


def _missing(name: str, columns: Columns) -> str:
    """The params key that names a missing text or label field, for messages."""
    return columns.key(name) if name in (columns.item, columns.label) else \
        "ingest.item_column: null reads `text`, or the only other field"


def _record(fields: dict, path: Path, line: int, columns: Columns) -> Record:
    """The record of one parsed line (`line` of the file at `path`); a missing or mistyped field
    fails the stage naming file, line, the field, its params key and the fields it has."""
    where = f"text.ingest.source {path}: line {line}"
    text_name = text_field(list(fields), columns)
    for name in (text_name, columns.label):
        if fields.get(name) is None:
            has = ", ".join(f"`{k}`" for k in fields if fields[k] is not None) or "none"
            raise StageError(f"{where}: no `{name}` field ({_missing(name, columns)}; the record "
                             f"has {has})")
    text = fields[text_name]
    if not isinstance(text, str):
        raise StageError(f"{where}: `{text_name}` must be a string, got "
                         f"{type(text).__name__} {text!r}")
    try:
        data = text.encode("utf-8", "surrogateescape")  # the file's own bytes, also invalid ones
    except UnicodeEncodeError:  # a JSON-escaped lone surrogate: invalid UTF-8, validate names it
        data = text.encode("utf-8", "surrogatepass")
    return Record(data, label_of(fields[columns.label], where, columns.label),
                  split_of(fields.get(columns.split), where, columns.split),
                  f"{path.name}:line {line}", ".txt")


def read_jsonl(path: Path, columns: Columns) -> Iterator[Record]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"text.ingest.source {path}: line {n}: not valid JSON ({e.msg}, column "
                                 f"{e.pos + 1})") from None
            if not isinstance(fields, dict):
                raise StageError(f"text.ingest.source {path}: line {n}: expected a JSON object with "
                                 f"the text and `{columns.label}`, got {type(fields).__name__}")
            yield _record(fields, path, n, columns)


def read_delimited(path: Path, columns: Columns, delimiter: str) -> Iterator[Record]:
    """A CSV (delimiter ",": RFC 4180 quoting) or TSV (delimiter "\t": no quoting) file's
    records, by the header's column names, read a record at a time."""
    # surrogateescape: bytes that are not UTF-8 reach validate unchanged; Excel writes a BOM
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise StageError(f"text.ingest.source {path}: empty (expected a header naming the "
                             f"text, `{columns.label}` and optionally `{columns.split}`)") from None
        except csv.Error as e:
            raise StageError(f"text.ingest.source {path}: line 1: {e}") from None
        header[0] = header[0].removeprefix("\ufeff")
        text_name = text_field(header, columns)
        missing = [name for name in (text_name, columns.label) if name not in header]
        if missing:
            raise StageError(f"text.ingest.source {path}: line 1: the header names no "
                             f"`{missing[0]}` column ({_missing(missing[0], columns)}); it has "
                             + ", ".join(f"`{h}`" for h in header))
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: name the record's first
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise StageError(f"text.ingest.source {path}: line {start}: {e}") from None
            if not values:
                continue
            if len(values) != len(header):
                raise StageError(f"text.ingest.source {path}: line {start}: {len(values)} fields, "
                                 f"the header has {len(header)}")
            yield _record(dict(zip(header, values)), path, start, columns)
