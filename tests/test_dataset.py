"""The data seam (pipeline/core/dataset.py): items written as Parquet shards (the same items give
the same bytes; added items leave the shards before them untouched) and a split read back in
batches, with its length and class list known before any item is read, in shard order."""
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import StageError
from pipeline.core.dataset import (ShardWriter, load_texts, read_manifest, read_text, shard_files,
                                   split_items, write_items)

CLASSES = ["zebra", "äpfel", "42"]  # not sorted, not ASCII, a digit name: a user's classes


def text_items(per_split: dict[str, int]) -> list[tuple[dict, bytes]]:
    return [({"id": f"texts/{split}/{CLASSES[i % 3]}/{i:04d}.txt", "label": CLASSES[i % 3],
              "split": split, "source": f"source/{split}/{i}.txt"},
             f"{split} text {i} of {CLASSES[i % 3]}".encode())
            for split, n in per_split.items() for i in range(n)]


def texts_folder(root: Path, per_split: dict[str, int], **sizes) -> Path:
    write_items(root, text_items(per_split), CLASSES, **sizes)
    return root


def test_a_split_streams_in_batches_in_shard_order(tmp_path):
    folder = texts_folder(tmp_path, {"train": 257, "val": 13, "test": 40}, shard_items=40)
    assert len(shard_files(folder, "train")) > 3  # batches cross shard ends
    items = split_items(folder, "train", read_text, "texts")
    assert len(items) == 257 and items.classes == CLASSES  # known before any item is read
    batches = list(items.batches(100))
    assert [len(texts) for texts, _ in batches] == [100, 100, 57]
    assert all(len(texts) == len(labels) for texts, labels in batches)
    texts = [t for batch, _ in batches for t in batch]
    labels = np.concatenate([labels for _, labels in batches])
    assert texts[:2] == ["train text 0 of zebra", "train text 1 of äpfel"]
    assert texts == [f"train text {i} of {CLASSES[i % 3]}" for i in range(257)]
    assert labels.dtype == np.int64 and labels[:4].tolist() == [0, 1, 2, 0]
    loaded, loaded_labels = load_texts(folder, "train")  # the whole split, as stages read it
    assert loaded == texts and loaded_labels.tolist() == labels.tolist()


def test_an_empty_split_names_the_manifest(tmp_path):
    folder = texts_folder(tmp_path, {"train": 6, "test": 3})
    with pytest.raises(StageError, match=r"manifest\.json: no texts in split 'val'"):
        split_items(folder, "val", read_text, "texts")
    with pytest.raises(StageError, match=r"nowhere/manifest\.json: not found"):
        read_manifest(tmp_path / "nowhere")


def text_length(data: bytes) -> np.ndarray:
    return np.array([len(read_text(data))], np.int64)


def test_array_items_stack_per_batch_and_outputs_keep_shard_order(tmp_path):
    """The stream evaluate and package score: array items (pixels, waveforms) come as one array
    per batch, and a function of every batch (a model's logits) comes back one row per item in
    shard order, however the split is cut."""
    folder = texts_folder(tmp_path, {"train": 5, "val": 2, "test": 23}, shard_items=4)
    items = split_items(folder, "test", text_length, "texts")
    first, labels = next(items.batches(10))
    assert isinstance(first, np.ndarray) and first.shape == (10, 1) and len(labels) == 10
    whole = items.batch_outputs(len(items), lambda batch: batch * 2)
    for size in (1, 7, 23):
        assert items.batch_outputs(size, lambda batch: batch * 2).tolist() == whole.tolist()
    texts = load_texts(folder, "test")[0]
    assert whole[:, 0].tolist() == [2 * len(t) for t in texts]
    rows, files, taken = items.take(np.array([0, 5, 22]))
    ids = [r["id"] for r in read_manifest(folder)[0] if r["split"] == "test"]
    assert [r["id"] for r in rows] == [ids[i] for i in (0, 5, 22)]
    assert [read_text(f) for f in files] == [texts[i] for i in (0, 5, 22)]
    assert taken.tolist() == [[len(texts[i])] for i in (0, 5, 22)]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_items_give_the_same_shards_byte_for_byte(tmp_path):
    first = shard_bytes(texts_folder(tmp_path / "a", {"train": 900, "val": 50, "test": 50},
                                     shard_items=100))
    again = shard_bytes(texts_folder(tmp_path / "b", {"train": 900, "val": 50, "test": 50},
                                     shard_items=100))
    assert first == again and len(first) > 10


def test_items_added_leave_the_shards_before_them_untouched(tmp_path):
    """Shards end where an item's id hashes to a cut: 1% more items at the end of a split
    rewrite its last shard and add new ones; an item inserted in the middle rewrites the shard
    it lands in (perhaps with its neighbour); every other file keeps its bytes (what `dvc push`
    would send again: nothing)."""
    items = text_items({"train": 10_000})
    before = shard_bytes(texts_folder(tmp_path / "before", {"train": 10_000},
                                      shard_items=500))
    shards = [k for k in before if k.endswith(".parquet")]
    assert 10 <= len(shards) <= 40
    grown = items + [({**row, "id": f"texts/train/new/{i}.txt"}, data)
                     for i, (row, data) in enumerate(text_items({"train": 100}))]
    write_items(tmp_path / "grown", grown, CLASSES, shard_items=500)
    after = shard_bytes(tmp_path / "grown")
    new_or_changed = {k for k, v in after.items() if before.get(k) != v and k.endswith(".parquet")}
    kept = {k for k in shards if before[k] == after.get(k)}
    assert len(kept) >= len(shards) - 1 and len(new_or_changed) <= 2  # the last and a new one
    inserted = items[:5000] + [({**items[0][0], "id": "texts/train/zebra/04999x.txt"}, b"new")] \
        + items[5000:]
    write_items(tmp_path / "inserted", inserted, CLASSES, shard_items=500)
    changed = {k for k, v in shard_bytes(tmp_path / "inserted").items()
               if k.endswith(".parquet") and k not in kept_names(before, v)}
    assert len(changed) <= 2, changed


def kept_names(before: dict[str, bytes], data: bytes) -> set[str]:
    """The names of the files in `before` holding exactly `data` (DVC keys files by content)."""
    return {k for k, v in before.items() if v == data}


def test_row_groups_hold_at_most_row_group_bytes(tmp_path):
    items = [({"id": f"b/{i}", "label": "a", "split": "train", "source": f"{i}"}, bytes(1000))
             for i in range(100)]
    write_items(tmp_path, items, ["a"], row_group_bytes=10_000)
    (path,) = shard_files(tmp_path, "train")
    groups = pq.ParquetFile(path).metadata
    assert groups.num_row_groups == 10
    assert all(groups.row_group(g).num_rows == 10 for g in range(groups.num_row_groups))


def test_an_item_in_no_split_is_refused_naming_its_source(tmp_path):
    with ShardWriter(tmp_path, 10, 1000) as writer:
        writer.add("x/1", "a", "train", "one.txt", b"1")
        with pytest.raises(StageError, match=r"two\.txt: split 'dev' is not one of train, val, test"):
            writer.add("x/2", "a", "dev", "two.txt", b"2")
