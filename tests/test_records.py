"""Records sources (pipeline/core/records.py): Parquet files and folders as data tools export them,
WebDataset tar shards, and text JSON Lines/CSV, each ingested as a stream and validated, for
every modality, with data that does not look like the demos."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from pipeline.core.dataset import read_manifest
from tests.ingested import items_of
from tests.languages import LANGUAGES, texts as language_texts
from tests.stage_runs import VALIDATE, ingest_and_validate

SHAPES = ("ring", "square", "wedge")


def photo(seed: int, size=(40, 30)) -> bytes:
    """An RGB JPEG of noise, a size the model does not read (resized by preprocessing)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def clip(n: int, rate: int = 8000) -> bytes:
    """A FLAC of the n-th tone, 0.4 s, at a rate the model does not hear (resampled)."""
    t = np.arange(int(rate * 0.4)) / rate
    out = io.BytesIO()
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * (200 + 25 * n) * t)).astype(np.float32),
                    rate, format="FLAC")
    return out.getvalue()


def tar_of(path: Path, members: dict[str, bytes]) -> None:
    """A WebDataset shard: `members` (name -> bytes) in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def hf_parquet(path: Path, items: list[tuple[bytes, int]], column: str, names: list[str]) -> None:
    """A Parquet file as Hugging Face `datasets` writes one (Dataset.to_parquet): the item as a
    {bytes, path} struct, the label as ClassLabel integers named in the schema metadata."""
    features = {column: {"_type": "Image" if column == "image" else "Audio"},
                "label": {"names": names, "_type": "ClassLabel"}}
    table = pa.table({column: [{"bytes": data, "path": f"{k}.jpg" if column == "image" else None}
                               for k, (data, _) in enumerate(items)],
                      "label": pa.array([label for _, label in items], pa.int64())})
    table = table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_a_hugging_face_parquet_export_ingests_by_file_split_with_class_names(tmp_path, project,
                                                                             stage):
    # data/<split>-00000-of-0000N.parquet, as a dataset's Parquet branch on the Hub holds it
    root = tmp_path / "shapes"
    n = {"train": 60, "validation": 12, "test": 15}
    seed = 0
    for split, count in n.items():
        for part in range(2 if split == "train" else 1):
            items = [(photo(seed := seed + 1), k % 3) for k in range(count // (2 if split == "train" else 1))]
            hf_parquet(root / "data" / f"{split}-0000{part}-of-0000{2 if split == 'train' else 1}.parquet",
                       items, "image", list(SHAPES))
    code, out = stage(project(root), "ingest", "--out", "data/ingested")
    assert code == 0 and "ingest: 87 images from " in out, out
    assert "{'train': 60, 'val': 12, 'test': 15}" in out
    code, out = stage(project(root), *VALIDATE)
    assert code == 0, out
    ingested = items_of(project(root) / "data/ingested")
    assert read_manifest(project(root) / "data/ingested")[1] == list(SHAPES)
    first_row, first_bytes = ingested[0]
    assert first_row["source"] == "data/train-00000-of-00002.parquet:row 0"
    assert first_row["label"] == "ring" and first_row["id"].startswith("images/train/ring/")
    assert first_row["id"].endswith(".jpg")
    assert first_bytes == photo(1)  # the bytes as stored, not re-encoded


def test_webdataset_shards_of_audio_ingest_with_labels_from_cls_and_json(tmp_path, audio_project,
                                                                       stage):
    root = tmp_path / "calls"
    root.mkdir()
    for shard in range(3):
        samples = {}
        for k in range(16):
            word = ("hello", "stop")[k % 2]
            key = f"s{shard}/{k:04d}"
            samples[key + ".flac"] = clip(shard * 16 + k + (40 if word == "stop" else 0))
            if shard == 1:  # a label as a .cls member; elsewhere a field of the .json member
                samples[key + ".cls"] = word.encode()
            else:
                samples[key + ".json"] = json.dumps({"label": word, "speaker": k}).encode()
        tar_of(root / f"calls-{shard:03d}.tar", samples)
    work = audio_project(root)
    code, out = stage(work, "ingest", "--out", "data/ingested")
    assert code == 0 and "ingest: 48 clips from " in out, out
    code, out = stage(work, *VALIDATE)
    assert code == 0, out
    assert read_manifest(work / "data/ingested")[1] == ["hello", "stop"]
    rows = [r for r, _ in items_of(work / "data/ingested")]
    assert {r["source"].split(":")[0] for r in rows} == {f"calls-{s:03d}.tar" for s in range(3)}
    assert all(r["id"].endswith(".flac") for r in rows)


def test_a_parquet_of_texts_without_splits_gets_the_seeded_stratified_split(
        tmp_path, text_project, stage):
    texts = [(text, language) for language in LANGUAGES  # six made-up languages, 20 texts each
             for text in language_texts(language, 20, seed=4)]
    table = pa.table({"id": list(range(len(texts))), "sentence": [t for t, _ in texts],
                      "lang": [language for _, language in texts]})
    path = tmp_path / "export.parquet"
    pq.write_table(table, path, row_group_size=7)
    work = text_project(path, ingest={"label_column": "lang"})
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    ingested = items_of(work / "data/ingested")
    assert len(ingested) == len(texts)
    counts = {s: sum(r["split"] == s for r, _ in ingested) for s in ("train", "val", "test")}
    assert counts == {"train": 84, "val": 12, "test": 24}  # 14/2/4 of each language's 20
    by_source = {r["source"]: data.decode() for r, data in ingested}
    assert by_source["export.parquet:row 9"] == texts[9][0]


@pytest.mark.parametrize("make, message", [
    (lambda p: pq.write_table(pa.table({"image": [b"x"], "cls": ["a"]}), p),
     "export.parquet: no `label` column (ingest.label_column); it has `image`, `cls`"),
    (lambda p: pq.write_table(pa.table({"a": [b"x"], "b": [b"y"], "label": ["c"]}), p),
     "more than one column could hold the items (bytes, string, or a struct with `bytes`): `a`, "
     "`b`; name it in ingest.item_column"),
    (lambda p: pq.write_table(pa.table({"image": [{"bytes": None, "path": "/data/1.png"}],
                                        "label": ["c"]}), p),
     "export.parquet: row 0: `image` holds no bytes, only the path '/data/1.png', which is not read"),
    (lambda p: pq.write_table(pa.table({"image": [b"x", b"y"], "label": ["c", "d"],
                                        "split": ["train", "dev"]}), p),
     "export.parquet: row 1: `split` must be one of train, val, test, got 'dev'"),
    (lambda p: pq.write_table(pa.table({"image": [b"x", b"y"], "label": ["c", None]}), p),
     "export.parquet: row 1: `label` must be a string or an integer, got None"),
    (lambda p: p.write_bytes(b"PAR1 but not really"), "export.parquet: not a readable Parquet file"),
    (lambda p: pq.write_table(pa.table({"image": pa.array([], pa.binary()),
                                        "label": pa.array([], pa.string())}), p),
     "image.ingest.source {path}: holds no records"),
])
def test_a_parquet_source_that_cannot_be_read_stops_ingest_naming_file_row_and_column(
        tmp_path, project, stage, make, message):
    path = tmp_path / "export.parquet"
    make(path)
    code, out = stage(project(path), "ingest", "--out", "data/ingested")
    assert code == 1
    assert "kiln ingest: error: " in out and message.format(path=path) in out, out
    assert not (project(path) / "data/ingested/manifest.json").exists()


@pytest.mark.parametrize("members, message", [
    ({"a.jpg": b"x", "a.txt": b"caption"}, "shards.tar: a: no label (a a.cls member, or a "
     "`label` field, ingest.label_column, in a.json)"),
    ({"a.txt": b"caption", "a.cls": b"1"}, "shards.tar: a: no member named like images"),
    ({"a.jpg": b"x", "a.png": b"y", "a.cls": b"1"}, "shards.tar: a: more than one member named "
     "like images"),
    ({"a.jpg": b"x", "a.json": b"{oops"}, "shards.tar: a.json: not valid JSON"),
])
def test_a_webdataset_sample_without_a_label_or_item_is_named_by_shard_and_key(
        tmp_path, project, stage, members, message):
    tar_of(tmp_path / "shards.tar", members)
    code, out = stage(project(tmp_path / "shards.tar"), "ingest", "--out", "data/ingested")
    assert code == 1 and message in out, out


def test_an_item_over_the_size_limit_in_a_records_source_is_named(tmp_path, project, stage):
    tar_of(tmp_path / "shards.tar", {"a.jpg": photo(1), "a.cls": b"1",
                                     "b.jpg": b"x" * 5000, "b.cls": b"2"})
    code, out = stage(project(tmp_path / "shards.tar", ingest={"max_file_bytes": 4000}),
                      "ingest", "--out", "data/ingested")
    assert code == 1
    assert "shards.tar:b.jpg: 5000 bytes, over ingest.max_file_bytes 4000" in out, out
