"""Stage 1: materialise the data set as image files plus a manifest (path, label, split).

Output folder layout:
    images/<split>/<class>/<file>   copies of the source images (PNG/JPEG)
    manifest.csv                    path (relative to the folder), label, split
    classes.json                    the class names; a label's index is its position here
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import StageError
from pipeline.params import Split, load_params

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def stratified_split(labels: list[str], split: Split, seed: int) -> list[str]:
    """Seeded per-class shuffle; each class gives round(n*fraction) to val and test, rest to train."""
    rng = np.random.default_rng(seed)
    assigned = [""] * len(labels)
    for label in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == label]
        rng.shuffle(idx)
        n_test = max(1, round(len(idx) * split.test)) if len(idx) >= 3 else 0
        n_val = max(1, round(len(idx) * split.val)) if len(idx) >= 3 else 0
        for k, i in enumerate(idx):
            assigned[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return assigned


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(root: Path, split: Split, seed: int) -> list[tuple[Path, str, str]]:
    """(source file, class, split) for a folder of class subfolders, optionally pre-split."""
    if not root.is_dir():
        raise StageError(f"data.source: {root} is not a folder (nor 'digits')")
    top = _class_dirs(root)
    if top and {p.name for p in top} <= set(SPLITS):
        if {p.name for p in top} != set(SPLITS):
            raise StageError(f"{root}: a pre-split folder needs train/, val/ and test/; "
                             f"found {', '.join(p.name for p in top)}")
        return [(f, c.name, s.name) for s in top for c in _class_dirs(s) for f in _images_in(c)]
    if not top:
        raise StageError(f"{root}: no class subfolders found")
    files = [(f, c.name) for c in top for f in _images_in(c)]
    splits = stratified_split([label for _, label in files], split, seed)
    return [(f, label, s) for (f, label), s in zip(files, splits)]


def ingest(source: str, out: Path, split: Split, seed: int) -> list[dict]:
    """Write the images, manifest.csv and classes.json under `out`; return the manifest rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if source == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()  # 8x8 pixels in 0..16, bundled with scikit-learn
        labels = [str(t) for t in digits.target]
        splits = stratified_split(labels, split, seed)
        pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
        for i, (image, label, s) in enumerate(zip(pixels, labels, splits)):
            rel = Path("images", s, label, f"{i:04d}.png")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(out / rel)
            rows.append({"path": rel.as_posix(), "label": label, "split": s})
    else:
        for src, label, s in scan_folder(Path(source), split, seed):
            rel = Path("images", s, label, src.name)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
            rows.append({"path": rel.as_posix(), "label": label, "split": s})
    if not rows:
        raise StageError(f"data.source: {source} holds no PNG/JPEG images")
    classes = sorted({r["label"] for r in rows})
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    return rows


def read_manifest(folder: Path) -> tuple[list[dict], list[str]]:
    """The rows of folder/manifest.csv and the class names of folder/classes.json."""
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((folder / "classes.json").read_text())
    return rows, classes


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline ingest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    p = load_params().data
    rows = ingest(p.source, args.out, p.split, p.seed)
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    print(f"ingest: {len(rows)} images from {p.source}: {counts}")


def load_split(folder: Path, split: str, prep) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split through `prep` (a Preprocessing): uint8 (N, C, S, S) pixels, int64 labels."""
    rows, classes = read_manifest(folder)
    index = {c: i for i, c in enumerate(classes)}
    rows = [r for r in rows if r["split"] == split]
    if not rows:
        raise StageError(f"{folder / 'manifest.csv'}: no images in split {split!r}")
    pixels = np.stack([prep.load(folder / r["path"]) for r in rows])
    return pixels, np.array([index[r["label"]] for r in rows], dtype=np.int64)


def data_hash(folder: Path) -> str:
    """sha256 over the manifest and every image it lists, in manifest order."""
    digest = hashlib.sha256((folder / "manifest.csv").read_bytes())
    for row in read_manifest(folder)[0]:
        digest.update((folder / row["path"]).read_bytes())
    return digest.hexdigest()
