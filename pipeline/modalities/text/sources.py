"""The text modality's `sources` part (pipeline/core/modality.py, called by the ingest stage): text
sources (text.ingest.source) read into the ingested layout of pipeline/core/dataset.py:
one document per item, with the id texts/<split>/<class>/<name>.txt.

    languages         built in: language identification from the dialogs that ship inside the
                      chatterbot-corpus wheel (no download), LANGUAGES, text.ingest.per_class each
    <folder>          one subfolder per class of .txt files, optionally pre-split into
                      train/ val/ test/ (scikit-learn's load_files layout; pipeline/core/folders.py:
                      hidden and system files skipped, what cannot be taken refused by name)
    <file>.jsonl      one JSON object per line with a text, a label and optionally a split
                      field (named by text.ingest.text_column, text.ingest.label_column, text.ingest.split_column:
                      `text`, `label`, `split` by default; other fields ignored)
    <file>.csv        a header naming those columns (other columns ignored); RFC 4180: fields
                      holding commas, quotes or line breaks are quoted
    <file>.tsv        the same, tab-separated, as IANA's text/tab-separated-values: no quoting,
                      one record per line, a quote is text (a text holding a tab or a line break
                      needs .csv or .jsonl)

Files are stored byte for byte; a .jsonl/.csv/.tsv text is stored as its UTF-8 bytes, and bytes
that are not UTF-8 are carried through unchanged (surrogateescape), so the validate stage, which
decodes every text, names the line they came from. A record that does not parse, or lacks a
field, fails here, naming the file and line; a header without the text or label column fails
naming the file, the column, its params key and the columns the header has. Without a split
field the split is data.split, stratified and seeded like images (pipeline/core/folders.py); a file
gives a split to every record or to none.
"""
from __future__ import annotations

import csv
import io
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pipeline import StageError
from pipeline.core.dataset import SPLITS, ShardWriter
from pipeline.core.folders import FileKind, copy_folder, stratified_split
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


@dataclass(frozen=True)
class Columns:
    """The field (JSON Lines) or header column (CSV, TSV) names of a records file's text, label
    and optional split: text.ingest.text_column, text.ingest.label_column, text.ingest.split_column."""
    text: str
    label: str
    split: str

    def key(self, name: str) -> str:
        """The params key that names column `name`, for messages."""
        return {self.text: "text.ingest.text_column", self.label: "text.ingest.label_column",
                self.split: "text.ingest.split_column"}[name]


def source(params: Params) -> str:
    """text.ingest.source: where the texts come from."""
    return params.text.ingest.source


def ingest(params: Params, out: ShardWriter) -> list[str]:
    """Add the texts of text.ingest.source to the shards `out`; return the class names."""
    t = params.text.ingest
    return ingest_texts(t.source, out, params.data.split, params.data.seed,
                        params.ingest.max_file_bytes, t.per_class,
                        Columns(t.text_column, t.label_column, t.split_column))


def ingest_texts(source: str, out: ShardWriter, split: Split, seed: int, max_file_bytes: int,
                 per_class: int, columns: Columns) -> list[str]:
    """Add the texts to the shards `out`; return the class names."""
    path = Path(source)
    suffix = path.suffix.lower()
    if source == "languages":
        classes = write_records(built_in_languages(per_class, seed), out, split, seed)
    elif path.is_dir():
        classes = copy_folder(path, out, "texts", split, seed, max_file_bytes, TEXTS,
                              "text.ingest.source")
    elif suffix in RECORD_FILES and path.is_file():
        records = read_jsonl(path, columns) if RECORD_FILES[suffix] is None else \
            read_delimited(path, columns, RECORD_FILES[suffix])
        classes = write_records(records, out, split, seed)
    else:
        raise StageError(f"text.ingest.source {source}: not a folder, a .jsonl, .csv or .tsv file "
                         "(nor 'languages')")
    if not out.items:
        raise StageError(f"text.ingest.source {source}: holds no texts")
    return classes


# A record: (text bytes, label, split or None, source: where it came from, for messages).
Record = tuple[bytes, str, str | None, str]


def write_records(records: list[Record], out: ShardWriter, split: Split, seed: int) -> list[str]:
    """Each record as the item texts/<split>/<label>/<n>.txt, n its position; the class names."""
    given = [r[2] for r in records]
    splits = given if records and given[0] is not None else \
        stratified_split([r[1] for r in records], split, seed)
    width = len(str(len(records)))
    for n, ((data, label, _, source), s) in enumerate(zip(records, splits)):
        out.add(f"texts/{s}/{label}/{n:0{width}d}.txt", label, s, source, data)
    return sorted({r[1] for r in records})


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
        records += [(own[i][0].encode("utf-8"), language, None, own[i][1]) for i in chosen]
    return records


def _label(value, where: str, name: str) -> str:
    """A record's label (its column `name`) as a class name: a string or an integer, NFC with
    outer blanks removed, usable as a folder name."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise StageError(f"{where}: `{name}` must be a string or an integer, got {value!r}")
    label = unicodedata.normalize("NFC", str(value)).strip()
    if not label or label in (".", "..") or "/" in label or "\0" in label:
        raise StageError(f"{where}: label {value!r} cannot name a class folder (blank, '.', "
                         "'..', or holds '/' or NUL)")
    return label


def _record(fields: dict, path: Path, line: int, columns: Columns) -> Record:
    """The record of one parsed line (`line` of the file at `path`); a missing or mistyped field
    fails the stage naming file, line, the field, its params key and the fields it has."""
    where = f"text.ingest.source {path}: line {line}"
    for name in (columns.text, columns.label):
        if fields.get(name) is None:
            has = ", ".join(f"`{k}`" for k in fields if fields[k] is not None) or "none"
            raise StageError(f"{where}: no `{name}` field ({columns.key(name)}; the record "
                             f"has {has})")
    text = fields[columns.text]
    if not isinstance(text, str):
        raise StageError(f"{where}: `{columns.text}` must be a string, got "
                         f"{type(text).__name__} {text!r}")
    split = fields.get(columns.split)
    if split is not None and split not in SPLITS:
        raise StageError(f"{where}: `{columns.split}` must be one of {', '.join(SPLITS)}, got "
                         f"{split!r}")
    try:
        data = text.encode("utf-8", "surrogateescape")  # the file's own bytes, also invalid ones
    except UnicodeEncodeError:  # a JSON-escaped lone surrogate: invalid UTF-8, validate names it
        data = text.encode("utf-8", "surrogatepass")
    return (data, _label(fields[columns.label], where, columns.label), split,
            f"{path.name}:line {line}")


def _same_split_rule(records: list[Record], path: Path, columns: Columns) -> list[Record]:
    """Every record gives a split, or none does; the first that breaks the rule is named."""
    if records:
        first = records[0][2] is not None
        for r in records:
            if (r[2] is not None) != first:
                raise StageError(f"text.ingest.source {path}: {r[3]} has {'no' if first else 'a'} "
                                 f"`{columns.split}` field, unlike {records[0][3]} (give every "
                                 "record a split, or none)")
    return records


def read_jsonl(path: Path, columns: Columns) -> list[Record]:
    records = []
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
                                 f"`{columns.text}` and `{columns.label}`, got "
                                 f"{type(fields).__name__}")
            records.append(_record(fields, path, n, columns))
    return _same_split_rule(records, path, columns)


def read_delimited(path: Path, columns: Columns, delimiter: str) -> list[Record]:
    """A CSV (delimiter ",": RFC 4180 quoting) or TSV (delimiter "\t": no quoting) file's
    records, by the header's column names."""
    # surrogateescape: bytes that are not UTF-8 reach validate unchanged; Excel writes a BOM
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise StageError(f"text.ingest.source {path}: empty (expected a header naming "
                         f"`{columns.text}`, `{columns.label}` and optionally "
                         f"`{columns.split}`)") from None
    except csv.Error as e:
        raise StageError(f"text.ingest.source {path}: line 1: {e}") from None
    missing = [name for name in (columns.text, columns.label) if name not in header]
    if missing:
        raise StageError(f"text.ingest.source {path}: line 1: the header names no `{missing[0]}` "
                         f"column ({columns.key(missing[0])}); it has "
                         + ", ".join(f"`{h}`" for h in header))
    records = []
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
            raise StageError(f"text.ingest.source {path}: line {start}: {len(values)} fields, the "
                             f"header has {len(header)}")
        fields = dict(zip(header, values))
        if fields.get(columns.split) == "":
            fields[columns.split] = None
        records.append(_record(fields, path, start, columns))
    return _same_split_rule(records, path, columns)
