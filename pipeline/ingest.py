"""Stage 1: materialise the data set as image files plus a manifest (pipeline/dataset.py has the
layout). classes.json lists every class folder, also one without images, so the validate stage
can name it; a manifest row's source is relative to data.source.

A source folder may hold what desktops and sync tools leave behind: hidden files (`.DS_Store`,
`._x.png` resource forks), `Thumbs.db`, `desktop.ini`, `__MACOSX/`. Those are skipped and counted,
never fatal. Class names are taken from folder names in Unicode NFC with outer blanks removed, so
a folder copied from macOS (NFD names) and one typed on Linux name the same class.
"""
from __future__ import annotations

import argparse
import shutil
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import StageError
from pipeline.dataset import SPLITS, write_manifest
from pipeline.params import Split, load_params

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Written by file managers, sync and archive tools; never data. Hidden names (leading dot) too.
SYSTEM_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin",
                "system volume information", "icon\r"}


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


def is_system(path: Path) -> bool:
    """Hidden or OS/tool bookkeeping entries, skipped wherever a folder is listed."""
    return path.name.startswith(".") or path.name.lower() in SYSTEM_NAMES


def class_name(folder: Path) -> str:
    """The label a class folder stands for: NFC, outer blanks removed (see the module docstring)."""
    name = unicodedata.normalize("NFC", folder.name).strip()
    if not name:
        raise StageError(f"{folder}: a class folder name must not be blank")
    return name


def _images_in(folder: Path, skipped: list[Path]) -> list[Path]:
    """Image files of a class folder, by suffix; anything else is appended to `skipped`.

    Broken links and other unreadable entries with an image suffix are kept: copying them fails
    and names them, instead of the image silently going missing.
    """
    images = []
    for p in sorted(folder.iterdir()):
        if is_system(p) or p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(p)
        else:
            images.append(p)
    return images


def _class_dirs(folder: Path, skipped: list[Path]) -> list[Path]:
    dirs = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not is_system(p):
            dirs.append(p)
        else:
            skipped.append(p)
    return dirs


def _labels(dirs: list[Path]) -> dict[Path, str]:
    """Class folder -> label; two folders that mean the same label (after NFC and strip) fail."""
    labels = {d: class_name(d) for d in dirs}
    seen: dict[tuple[str, str], Path] = {}
    for d, label in labels.items():
        key = (d.parent.name, label)
        if key in seen:
            raise StageError(f"{seen[key]} and {d}: two class folders for the same class "
                             f"{label!r} (names differ only in Unicode form or outer blanks)")
        seen[key] = d
    return labels


def scan_folder(root: Path, split: Split, seed: int
                ) -> tuple[list[tuple[Path, str, str]], list[str], list[Path]]:
    """For a folder of class subfolders, optionally pre-split: (source file, class, split) rows,
    every class name (also of empty folders), and the skipped hidden/system/non-image entries."""
    if not root.is_dir():
        raise StageError(f"data.source: {root} is not a folder (nor 'digits')")
    skipped: list[Path] = []
    top = _class_dirs(root, skipped)
    if top and {p.name for p in top} <= set(SPLITS):
        if {p.name for p in top} != set(SPLITS):
            raise StageError(f"{root}: a pre-split folder needs train/, val/ and test/; "
                             f"found {', '.join(p.name for p in top)}")
        dirs = [c for s in top for c in _class_dirs(s, skipped)]
        labels = _labels(dirs)
        rows = [(f, labels[c], c.parent.name) for c in dirs for f in _images_in(c, skipped)]
        return rows, sorted(set(labels.values())), skipped
    if not top:
        raise StageError(f"{root}: no class subfolders found")
    labels = _labels(top)
    files = [(f, labels[c]) for c in top for f in _images_in(c, skipped)]
    splits = stratified_split([label for _, label in files], split, seed)
    rows = [(f, label, s) for (f, label), s in zip(files, splits)]
    return rows, sorted(labels.values()), skipped


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
            rows.append({"path": rel.as_posix(), "label": label, "split": s,
                         "source": f"sklearn digits[{i}]"})
        classes = sorted(set(labels))
    else:
        root = Path(source)
        found, classes, skipped = scan_folder(root, split, seed)
        unreadable = []
        for src, label, s in found:
            rel = Path("images", s, label, src.name)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, out / rel)
            except OSError as e:  # a broken link, no permission, an I/O error
                unreadable.append(f"{src.relative_to(root)} ({e.strerror or e})")
                continue
            rows.append({"path": rel.as_posix(), "label": label, "split": s,
                         "source": src.relative_to(root).as_posix()})
        if unreadable:
            raise StageError(f"data.source {root}: {len(unreadable)} image files cannot be read: "
                             + "; ".join(unreadable))
        if skipped:
            names = sorted({p.name for p in skipped})
            print(f"ingest: skipped {len(skipped)} hidden, system or non-image entries "
                  f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    if not rows:
        raise StageError(f"data.source: {source} holds no PNG/JPEG images")
    write_manifest(out, rows, classes)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline ingest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    p = load_params().data
    rows = ingest(p.source, args.out, p.split, p.seed)
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    print(f"ingest: {len(rows)} images from {p.source}: {counts}")
