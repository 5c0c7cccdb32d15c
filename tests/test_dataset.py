"""The data seam (pipeline/core/dataset.py Items): a split of an ingested folder read in batches, with
its length and class list known before any item is read, in manifest order."""
from pathlib import Path

import numpy as np
import pytest

from pipeline import StageError
from pipeline.core.dataset import load_texts, read_text, split_items, write_manifest

CLASSES = ["zebra", "äpfel", "42"]  # not sorted, not ASCII, a digit name: a user's classes


def texts_folder(root: Path, per_split: dict[str, int]) -> Path:
    """An ingested text folder: per_split[split] texts in each split, classes in turn."""
    rows = []
    for split, n in per_split.items():
        for i in range(n):
            label = CLASSES[i % 3]
            path = Path("texts") / split / label / f"{i:04d}.txt"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(f"{split} text {i} of {label}", encoding="utf-8")
            rows.append({"path": path.as_posix(), "label": label, "split": split,
                         "source": f"source/{i}.txt"})
    write_manifest(root, rows, CLASSES)
    return root


def test_a_split_streams_in_batches_in_manifest_order(tmp_path):
    folder = texts_folder(tmp_path, {"train": 257, "val": 13, "test": 40})
    items = split_items(folder, "train", read_text, "texts")
    assert len(items) == 257 and items.classes == CLASSES  # known before any item is read
    batches = list(items.batches(100))
    assert [len(texts) for texts, _ in batches] == [100, 100, 57]
    assert all(len(texts) == len(labels) for texts, labels in batches)
    texts = [t for batch, _ in batches for t in batch]
    labels = np.concatenate([labels for _, labels in batches])
    assert texts[:2] == ["train text 0 of zebra", "train text 1 of äpfel"]
    assert labels.dtype == np.int64 and labels[:4].tolist() == [0, 1, 2, 0]
    loaded, loaded_labels = load_texts(folder, "train")  # the whole split, as stages read it
    assert loaded == texts and loaded_labels.tolist() == labels.tolist()


def test_an_empty_split_names_the_manifest(tmp_path):
    folder = texts_folder(tmp_path, {"train": 6, "test": 3})
    with pytest.raises(StageError, match=r"manifest\.csv: no texts in split 'val'"):
        split_items(folder, "val", read_text, "texts")


def text_length(path: Path) -> np.ndarray:
    return np.array([len(read_text(path))], np.int64)


def test_array_items_stack_per_batch_and_outputs_keep_manifest_order(tmp_path):
    """The stream evaluate and package score: array items (pixels, waveforms) come as one array
    per batch, and a function of every batch (a model's logits) comes back one row per item in
    manifest order, however the split is cut."""
    folder = texts_folder(tmp_path, {"train": 5, "val": 2, "test": 23})
    items = split_items(folder, "test", text_length, "texts")
    first, labels = next(items.batches(10))
    assert isinstance(first, np.ndarray) and first.shape == (10, 1) and len(labels) == 10
    whole = items.batch_outputs(len(items), lambda batch: batch * 2)
    for size in (1, 7, 23):
        assert items.batch_outputs(size, lambda batch: batch * 2).tolist() == whole.tolist()
    texts = load_texts(folder, "test")[0]
    assert whole[:, 0].tolist() == [2 * len(t) for t in texts]
