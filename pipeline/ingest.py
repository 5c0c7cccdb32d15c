"""Stage 1: materialise the data set as image files plus a manifest (pipeline/dataset.py has the
layout). classes.json lists every class folder, also one without images, so the validate stage
can name it; a manifest row's source is relative to data.source.

A source folder may hold what desktops and sync tools leave behind: hidden files (`.DS_Store`,
`._x.png` resource forks), `Thumbs.db`, `desktop.ini`, `__MACOSX/`. Those are skipped and counted,
never fatal. An entry named like an image is copied only if it is a regular file inside the
folder, at most ingest.max_file_bytes long; anything else (a directory, device, FIFO or socket, a
link leading out of the folder or nowhere, a larger file) fails the stage, each named. Links
that stay inside the folder are followed: data-set tools build pre-split layouts and remove
duplicates with them, and their target is data the user put there.

Class names are taken from folder names in Unicode NFC with outer blanks removed, so a folder
copied from macOS (NFD names) and one typed on Linux name the same class.
"""
from __future__ import annotations

import argparse
import shutil
import stat
import unicodedata
from dataclasses import dataclass, field
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


@dataclass
class Listing:
    """What scanning a source folder found besides the images: entries skipped (hidden, system,
    not named like an image) and entries named like an image that are refused, with why."""
    source: Path         # the folder as data.source names it: messages are relative to it
    inside: Path         # the same, links resolved: what a file must resolve into
    max_file_bytes: int
    skipped: list[Path] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "<path relative to source> (<why>)"


# File types other than regular, as stat names them, and how a message says them.
_SPECIAL = ((stat.S_ISDIR, "a directory named like an image"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def refusal(path: Path, listing: Listing) -> str | None:
    """Why `path`, named like an image, is not copied; None for a regular file inside the source
    folder within the size limit."""
    try:
        target = path.resolve(strict=True)
        info = target.stat()
    except FileNotFoundError:
        return (f"a link to {path.readlink()}, which does not exist" if path.is_symlink()
                else "vanished while listed")
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13), EACCES
        return f"cannot be followed: {getattr(e, 'strerror', None) or e}"
    if not target.is_relative_to(listing.inside):
        how = "a link to" if path.is_symlink() else "through a linked folder, at"
        return f"{how} {target}, outside the data folder"
    for is_kind, kind in _SPECIAL:
        if is_kind(info.st_mode):
            return kind
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > listing.max_file_bytes:
        return f"{info.st_size} bytes, over ingest.max_file_bytes {listing.max_file_bytes}"
    return None


def _images_in(folder: Path, listing: Listing) -> list[Path]:
    """Image files of a class folder, by suffix; hidden, system and other entries go to
    listing.skipped, entries named like an image that cannot be taken to listing.refused."""
    images = []
    for p in sorted(folder.iterdir()):
        if is_system(p) or p.suffix.lower() not in IMAGE_SUFFIXES:
            listing.skipped.append(p)
        elif why := refusal(p, listing):
            listing.refused.append(f"{p.relative_to(listing.source)} ({why})")
        else:
            images.append(p)
    return images


def _class_dirs(folder: Path, listing: Listing) -> list[Path]:
    dirs = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not is_system(p):
            dirs.append(p)
        else:
            listing.skipped.append(p)
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


def scan_folder(root: Path, split: Split, seed: int, max_file_bytes: int
                ) -> tuple[list[tuple[Path, str, str]], list[str], Listing]:
    """For a folder of class subfolders, optionally pre-split: (source file, class, split) rows,
    every class name (also of empty folders), and what was skipped or refused."""
    if not root.is_dir():
        raise StageError(f"data.source: {root} is not a folder (nor 'digits')")
    listing = Listing(source=root, inside=root.resolve(), max_file_bytes=max_file_bytes)
    top = _class_dirs(root, listing)
    if top and {p.name for p in top} <= set(SPLITS):
        if {p.name for p in top} != set(SPLITS):
            raise StageError(f"{root}: a pre-split folder needs train/, val/ and test/; "
                             f"found {', '.join(p.name for p in top)}")
        dirs = [c for s in top for c in _class_dirs(s, listing)]
        labels = _labels(dirs)
        rows = [(f, labels[c], c.parent.name) for c in dirs for f in _images_in(c, listing)]
        return rows, sorted(set(labels.values())), listing
    if not top:
        raise StageError(f"{root}: no class subfolders found")
    labels = _labels(top)
    files = [(f, labels[c]) for c in top for f in _images_in(c, listing)]
    splits = stratified_split([label for _, label in files], split, seed)
    rows = [(f, label, s) for (f, label), s in zip(files, splits)]
    return rows, sorted(labels.values()), listing


def ingest(source: str, out: Path, split: Split, seed: int, max_file_bytes: int) -> list[dict]:
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
        found, classes, listing = scan_folder(root, split, seed, max_file_bytes)
        if listing.refused:
            raise StageError(f"data.source {root}: refused {len(listing.refused)} entries named "
                             "like images (only regular files inside the folder, up to "
                             "ingest.max_file_bytes, are taken): " + "; ".join(listing.refused))
        unreadable = []
        for src, label, s in found:
            rel = Path("images", s, label, src.name)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, out / rel)
            except OSError as e:  # no permission, an I/O error
                unreadable.append(f"{src.relative_to(root)} ({e.strerror or e})")
                continue
            rows.append({"path": rel.as_posix(), "label": label, "split": s,
                         "source": src.relative_to(root).as_posix()})
        if unreadable:
            raise StageError(f"data.source {root}: {len(unreadable)} image files cannot be read: "
                             + "; ".join(unreadable))
        if listing.skipped:
            names = sorted({p.name for p in listing.skipped})
            print(f"ingest: skipped {len(listing.skipped)} hidden, system or non-image entries "
                  f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    if not rows:
        raise StageError(f"data.source: {source} holds no PNG/JPEG images")
    write_manifest(out, rows, classes)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline ingest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    p = params.data
    rows = ingest(p.source, args.out, p.split, p.seed, params.ingest.max_file_bytes)
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    print(f"ingest: {len(rows)} images from {p.source}: {counts}")
