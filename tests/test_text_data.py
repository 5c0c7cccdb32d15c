"""Text data in (data.modality text): a user's folder of .txt files, a .jsonl and a .csv file and
the built-in language set ingest and validate; the bad-text matrix stops the run at validate (or
at ingest, where the input cannot be read as records) with exit 1 and the offending file named;
drift against a champion's text profile. Stages run as users run them, `python -m pipeline
<stage>` in a project folder with the repo's params.yaml shrunk (tests/conftest.py): one as a
subprocess, the rest in-process through pipeline.stages.__main__.main() (tests/test_bad_data.py's
`stage` fixture: same code path, no champion)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline.stages.validate
from pipeline.lifecycle.champion import Reference
from pipeline.core.dataset import ShardWriter, read_manifest
from pipeline.params import load_params
from pipeline.modalities.text import checks
from pipeline.core.records import Columns
from pipeline.modalities.text.sources import ingest_texts
from pipeline.modalities.text.words import text_key
from tests.ingested import items_of
from tests.stage_runs import VALIDATE, cli, ingest_and_validate, manifest, problems
from tests.ingested import train_profile

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("billing", "outage", "praise")
PER_CLASS = 10   # with the repo's 0.7/0.1/0.2 split: 7 train, 1 val, 2 test per class
# Each class draws its words from its own vocabulary: a ticket-triage toy set.
VOCABULARY = {
    "billing": "invoice charge refund payment card billed twice amount receipt plan".split(),
    "outage": "down error timeout server login page crash slow offline broken".split(),
    "praise": "thanks great love helpful quick support team awesome happy smooth".split(),
}


def document(rng: np.random.Generator, label: str, words: int = 8) -> str:
    return " ".join(rng.choice(VOCABULARY[label], words)) + ".\n"


def write_folder(root: Path, classes=CLASSES, splits=("",), per_class=PER_CLASS, seed=0) -> Path:
    """<split>/<class>/<n>.txt files of distinct generated documents."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                (root / split / label / f"{i}.txt").write_text(document(rng, label),
                                                              encoding="utf-8")
    return root


def stored(work: Path) -> dict[str, bytes]:
    """The bytes of every ingested text of the project `work`, by id."""
    return {row["id"]: data for row, data in items_of(work / "data/ingested")}


def records(n_per_class=PER_CLASS, seed=0, words=8) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": document(rng, label, words).strip(), "label": label}
            for label in CLASSES for _ in range(n_per_class)]


# --- sources that work -------------------------------------------------------------------------

def test_a_folder_of_txt_files_through_the_cli(tmp_path, text_project):
    """A user's <class>/<doc>.txt folder with desktop leftovers, through `python -m pipeline.stages`:
    the bytes arrive unchanged, validate passes and writes its reports."""
    source = write_folder(tmp_path / "src")
    (source / "billing/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (source / "outage/notes.md").write_text("# not a .txt document\n")
    work = text_project(source)
    ingested = cli(work, "ingest", "--out", "data/ingested")
    assert ingested.returncode == 0, ingested.stderr
    assert "ingest: 30 texts from" in ingested.stdout
    assert "skipped 2 hidden, system or non-.txt entries (.DS_Store, notes.md)" in ingested.stdout
    rows = manifest(work)
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    texts = stored(work)
    for r in rows:
        assert r["id"] == f"texts/{r['split']}/{r['label']}/{Path(r['source']).name}"
        assert texts[r["id"]] == (source / r["source"]).read_bytes()
    validated = cli(work, *VALIDATE)
    assert validated.returncode == 0, validated.stderr
    assert "validate: 30 texts, 3 classes, {'train': 21, 'val': 3, 'test': 6}" in validated.stdout
    metrics = json.loads((work / "reports/validation.json").read_text())
    assert metrics["success"] and metrics["texts"] == 30 and metrics["checks_failed"] == 0
    assert (work / "reports/data_docs/index.html").is_file()
    profile = json.loads((work / "reports/data_profile.json").read_text())
    assert profile["modality"] == "text" and profile["texts"] == 21
    assert set(profile["vocabulary"]) <= {w for ws in VOCABULARY.values() for w in ws} | {"."}


def test_a_jsonl_file_with_its_own_splits(tmp_path, text_project, stage):
    rows = records()
    for i, r in enumerate(rows):
        r["split"] = ("train", "train", "train", "val", "test")[i % 5]
    path = tmp_path / "tickets.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    + "\n", encoding="utf-8")  # a trailing blank line is no record
    work = text_project(path)
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    ingested = {r["source"]: r for r in manifest(work)}  # stored split by split
    assert {line: r["split"] for line, r in ingested.items()} == \
        {f"tickets.jsonl:line {i + 1}": r["split"] for i, r in enumerate(rows)}
    fifth = stored(work)[ingested["tickets.jsonl:line 5"]["id"]]
    assert fifth.decode("utf-8") == rows[4]["text"]
    assert json.loads((work / "reports/validation.json").read_text())["splits"] == \
        {"train": 18, "val": 6, "test": 6}


def test_a_csv_file_split_by_data_split(tmp_path, text_project, stage):
    """Excel's BOM, a quoted field over two lines, an extra column; labels as written."""
    rows = records()
    rows[0]["text"] = "two lines,\nquoted: invoice refund"
    path = tmp_path / "tickets.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "text"])
        writer.writerows([i, r["label"], r["text"]] for i, r in enumerate(rows))
    work = text_project(path)
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    # in record order (an id's name is its record's position; rows are stored split by split)
    ingested = sorted(manifest(work), key=lambda r: Path(r["id"]).name)
    assert [r["source"] for r in ingested[:3]] == ["tickets.csv:line 2", "tickets.csv:line 4",
                                                   "tickets.csv:line 5"]
    assert stored(work)[ingested[0]["id"]] == rows[0]["text"].encode()
    assert read_manifest(work / "data/ingested")[1] == list(CLASSES)


def test_the_built_in_language_set(tmp_path, text_project, stage):
    """text.ingest.source languages, shrunk to 20 texts per language: ten languages, stratified, no
    text in two languages, the same data on a rerun; it validates."""
    work = text_project("languages", {"ingest": {"per_class": 20}})
    code, out = stage(work, "ingest", "--out", "data/ingested")
    assert code == 0, out
    assert "ingest: 200 texts from languages: {'train': 140, 'val': 20, 'test': 40}" in out
    rows = manifest(work)
    texts = {i: data.decode("utf-8") for i, data in stored(work).items()}
    languages = {}
    for r in rows:
        languages.setdefault(text_key(texts[r["id"]]), set()).add(r["label"])
    assert len(languages) == 200 and all(len(ls) == 1 for ls in languages.values())
    assert read_manifest(work / "data/ingested")[1] == [
        "chinese", "dutch", "english", "italian", "japanese", "korean", "persian", "portuguese",
        "spanish", "ukrainian"]
    assert rows[0]["source"].startswith("chatterbot-corpus chinese/")
    shutil.copytree(work / "data/ingested", tmp_path / "first")
    assert stage(work, "ingest", "--out", "data/ingested")[0] == 0
    files = {p.relative_to(tmp_path / "first"): p.read_bytes()  # manifest.json and shards
             for p in sorted((tmp_path / "first").rglob("*")) if p.is_file()}
    assert Path("manifest.json") in files and files == {
        p.relative_to(work / "data/ingested"): p.read_bytes()
        for p in sorted((work / "data/ingested").rglob("*")) if p.is_file()}
    code, out = stage(work, *VALIDATE)
    assert code == 0, out


# --- the bad-text matrix: validate names the file ---------------------------------------------

def spoil_empty(source: Path) -> str:
    (source / "train/billing/blank.txt").write_text("  \n\t\n")
    return "empty text: No text is empty or only whitespace. -- 1 break it: train/billing/blank.txt"


def spoil_binary(source: Path) -> str:
    (source / "test/outage/screenshot.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    return "binary data: test/outage/screenshot.txt (NUL byte at offset 8 of 16 bytes)"


def spoil_not_utf8(source: Path) -> str:
    (source / "val/praise/latin1.txt").write_bytes("merci, très bien".encode("latin-1"))
    return "not UTF-8: val/praise/latin1.txt (byte 0xe8 at offset 9: invalid continuation byte)"


def spoil_duplicate(source: Path) -> str:
    """The same text with other case and spacing is the same text."""
    text = (source / "train/outage/3.txt").read_text()
    (source / "train/outage/3 copy.txt").write_text("  " + text.upper().replace(" ", "   "))
    return ("duplicate texts in a split: No two texts of one split are the same (compared in "
            "Unicode NFKC, case-folded, whitespace collapsed). -- 2 break it: "
            "train/outage/3 copy.txt (train) = train/outage/3.txt (train)")


def spoil_leak(source: Path) -> str:
    shutil.copyfile(source / "train/praise/2.txt", source / "test/praise/new.txt")
    return ("same text in two splits (leakage): No text appears in more than one split (compared "
            "in Unicode NFKC, case-folded, whitespace collapsed): a copy of a training text in val "
            "or test inflates the measured accuracy. -- 2 break it: "
            "train/praise/2.txt (train) = test/praise/new.txt (test)")


def spoil_one_class(source: Path) -> str:
    for split in ("train", "val", "test"):
        for label in CLASSES[1:]:
            shutil.rmtree(source / split / label)
    return "single class: The data set has at least two classes: a classifier needs two. -- found 1"


def spoil_too_long(source: Path) -> str:
    (source / "train/billing/essay.txt").write_text("invoice " * 40)
    return ("text length out of bounds: Every text has 1 to 30 words and punctuation marks "
            "(params text.validate.min_words, text.validate.max_words). -- 1 break it: "
            "train/billing/essay.txt (40 words)")


def spoil_class_missing_from_a_split(source: Path) -> str:
    shutil.rmtree(source / "val/outage")
    return "class short of texts in a split: Each class has at least 1 texts in each split " \
           "(params validate.min_items_per_class_per_split). -- 1 break it: val/outage (0 texts)"


@pytest.mark.parametrize("spoil", [spoil_empty, spoil_binary, spoil_not_utf8, spoil_duplicate,
                                   spoil_leak, spoil_one_class, spoil_too_long,
                                   spoil_class_missing_from_a_split], ids=lambda f: f.__name__[6:])
def test_bad_text_stops_validate_naming_the_file(tmp_path, text_project, stage, spoil):
    source = write_folder(tmp_path / "src", splits=("train", "val", "test"), per_class=4)
    expected = spoil(source)
    work = text_project(source, {"validate": {"max_words": 30}})
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "kiln validate: error:" in out and "1 data checks failed" in out
    assert expected in out


def test_non_utf8_bytes_in_a_jsonl_line_reach_validate(tmp_path, text_project, stage):
    lines = [json.dumps(r).encode() for r in records()]
    lines[7] = b'{"text": "caf\xe9 au lait", "label": "praise"}'  # Latin-1 bytes inside JSON
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    work = text_project(path)
    code, out = ingest_and_validate(stage, work)
    (row,) = [r for r in manifest(work) if r["source"] == "mixed.jsonl:line 8"]
    assert stored(work)[row["id"]] == b"caf\xe9 au lait"
    assert code == 1
    assert "not UTF-8: mixed.jsonl:line 8 (byte 0xe9 at offset 3: invalid continuation byte)" in out
    assert problems(work)["unreadable_texts"] == 1


# --- input that cannot be read as records: ingest names file and line -------------------------

@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n',
     "line 2: not valid JSON (Expecting value, column 24)"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "tag": "x"}\n',
     "line 2: no `label` field (ingest.label_column; the record has `text`, `tag`)"),
    ("bad.jsonl", '["a", "x"]\n', "line 1: expected a JSON object with the text and `label`"),
    ("bad.jsonl", '{"text": 5, "label": "x"}\n', "line 1: `text` must be a string, got int 5"),
    ("bad.jsonl", '{"text": "a", "label": "x", "split": "dev"}\n',
     "line 1: `split` must be one of train, val, test, got 'dev'"),
    ("bad.jsonl", '{"text": "a", "label": "x", "split": "test"}\n{"text": "b", "label": "y"}\n',
     "bad.jsonl:line 2 has no split, unlike bad.jsonl:line 1"),
    ("bad.jsonl", '{"text": "a", "label": "../etc"}\n',
     "line 1: label '../etc' cannot name a class"),
    ("bad.csv", "text,category\na,x\n",
     "line 1: the header names no `label` column (ingest.label_column); it has `text`, "
     "`category`"),
    ("bad.csv", 'text,label\na,x\n"b\nc",y,extra\n', "line 3: 3 fields, the header has 2"),
    ("bad.csv", "text,label\na,x\nb,\n", "line 3: label '' cannot name a class (blank"),
    ("notes.txt", "a lone text file\n",
     "not a folder, a .jsonl, .csv, .tsv, .parquet or .tar file (nor 'languages')"),
])
def test_unreadable_records_stop_ingest_naming_the_line(tmp_path, text_project, stage, name,
                                                        content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    code, out = stage(text_project(tmp_path / name), "ingest", "--out", "data/ingested")
    assert code == 1
    assert f"kiln ingest: error: text.ingest.source {tmp_path / name}: " in out and message in out


def test_a_txt_file_over_the_size_limit_is_refused_by_name(tmp_path, text_project, stage):
    source = write_folder(tmp_path / "src")
    (source / "praise/long.txt").write_text("thanks " * 200)
    (source / "outage/away.txt").symlink_to("/etc/hostname")
    code, out = stage(text_project(source, ingest={"max_file_bytes": 1000}), "ingest", "--out",
                      "data/ingested")
    assert code == 1 and "refused 2 entries named like .txt files" in out
    assert "praise/long.txt (1400 bytes, over ingest.max_file_bytes 1000)" in out
    assert "outage/away.txt (a link to /etc/hostname, outside the data folder)" in out


# --- drift against the champion's profile -------------------------------------------------------

@pytest.fixture(scope="module")
def champion_profile(tmp_path_factory) -> dict:
    """The data profile validate writes (and package stores with the champion) for a
    30-per-class .jsonl set, made by the functions validate calls."""
    root = tmp_path_factory.mktemp("champion")
    (root / "champion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(30, seed=1)))
    params = load_params(REPO / "params.yaml")
    t, i = params.text.ingest, params.ingest
    with ShardWriter(root / "ingested", 1 << 30, 1 << 26) as out:
        out.close(ingest_texts(str(root / "champion.jsonl"), out, params.data.split,
                               params.data.seed, params.ingest.max_file_bytes, t.per_class,
                               Columns(i.item_column, i.label_column, i.split_column)))
    return train_profile(root / "ingested", checks, params)


def test_the_same_kind_of_text_shows_no_drift(tmp_path, text_project, stage, monkeypatch,
                                              champion_profile):
    monkeypatch.setattr(pipeline.stages.validate, "reference",
                        lambda *_: Reference("champ:1", champion_profile, ""))
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(30, seed=2)))
    work = text_project(path)
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    drift = json.loads((work / "reports/validation_details.json").read_text())["drift"]
    assert drift["status"] == "ok" and drift["oov"]["rate"] == 0 and drift["champion"] == "champ:1"
    assert "validate: drift against champ:1: ok; label PSI 0.000, words PSI" in out
    assert "validate: Out-of-vocabulary words: 0.0% of the new train split" in out


def test_other_lengths_labels_and_words_fail_on_drift(tmp_path, text_project, stage, monkeypatch,
                                                      champion_profile):
    """Longer texts, mostly one class, and half the words new: each drift check names itself."""
    monkeypatch.setattr(pipeline.stages.validate, "reference",
                        lambda *_: Reference("champ:1", champion_profile, ""))
    rng = np.random.default_rng(3)
    shifted = [{"text": f"{document(rng, label, 20).strip()} " + " ".join(
                    f"word{int(rng.integers(1000))}" for _ in range(20)), "label": label}
               for label, n in (("billing", 60), ("outage", 10), ("praise", 10)) for _ in range(n)]
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in shifted))
    work = text_project(path)
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "drift from the champion's data" in out
    assert "label PSI" in out and "words PSI" in out and "words KS 1.000" in out
    assert "out-of-vocabulary share up 0.4" in out and "(params text.validate.oov_fail)" in out
    drift = json.loads((work / "reports/validation_details.json").read_text())["drift"]
    assert drift["status"] == "fail" and drift["oov"]["rate"] > 0.45


def test_an_image_profile_is_no_reference_for_texts(tmp_path, text_project, stage, monkeypatch):
    monkeypatch.setattr(pipeline.stages.validate, "reference", lambda *_: Reference(
        "digits:1", {"version": 1, "categorical": {"label": {}}, "quantiles": {}}, ""))
    code, out = ingest_and_validate(stage, text_project(write_folder(tmp_path / "src")))
    assert code == 1 and "the champion of this task (package.model_name and class list) was " \
        "trained on image data, this data set is text: give it another package.model_name" in out
