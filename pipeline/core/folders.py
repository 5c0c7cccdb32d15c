"""A source folder of class subfolders, as the ingest stage reads it for every modality: listing
(hidden and system entries skipped), refusals (what is named like a data file but cannot be
taken), class names, the seeded stratified split, and adding the files to the ingested shards.

A source folder may hold what desktops and sync tools leave behind: hidden files (`.DS_Store`,
`._x.png` resource forks), `Thumbs.db`, `desktop.ini`, `__MACOSX/`. Those are skipped and counted,
never fatal. An entry named like a data file (FileKind.suffixes) is copied only if it is a regular
file inside the folder, at most ingest.max_file_bytes long; anything else (a directory, device,
FIFO or socket, a link leading out of the folder or nowhere, a larger file) fails the stage, each
named. Links that stay inside the folder are followed: data-set tools build pre-split layouts and
remove duplicates with them, and their target is data the user put there.

Class names are taken from folder names in Unicode NFC with outer blanks removed, so a folder
copied from macOS (NFD names) and one typed on Linux name the same class.
"""
from __future__ import annotations

import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import StageError
from pipeline.core.dataset import SPLITS, ShardWriter
from pipeline.params import Split

# Written by file managers, sync and archive tools; never data. Hidden names (leading dot) too.
SYSTEM_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin",
                "system volume information", "icon\r"}


@dataclass(frozen=True)
class FileKind:
    """The data files of a modality and the words messages use for them."""
    suffixes: frozenset[str]  # lower case, with the dot
    one: str                  # "an image": "a directory named like an image"
    many: str                 # "images": "refused 2 entries named like images"
    files: str                # "image files": "2 image files cannot be read"
    other: str                # "non-image": "skipped 3 hidden, system or non-image entries"


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
    """What scanning a source folder found besides the data files: entries skipped (hidden,
    system, not named like a data file) and entries named like one that are refused, with why."""
    source: Path         # the folder as the params name it: messages are relative to it
    inside: Path         # the same, links resolved: what a file must resolve into
    max_file_bytes: int
    kind: FileKind
    skipped: list[Path] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "<path relative to source> (<why>)"


# File types other than regular, as stat names them, and how a message says them.
_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def refusal(path: Path, listing: Listing) -> str | None:
    """Why `path`, named like a data file, is not copied; None for a regular file inside the
    source folder within the size limit."""
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
    if stat.S_ISDIR(info.st_mode):
        return f"a directory named like {listing.kind.one}"
    for is_kind, kind in _SPECIAL:
        if is_kind(info.st_mode):
            return kind
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > listing.max_file_bytes:
        return f"{info.st_size} bytes, over ingest.max_file_bytes {listing.max_file_bytes}"
    return None


def _files_in(folder: Path, listing: Listing) -> list[Path]:
    """Data files of a class folder, by suffix; hidden, system and other entries go to
    listing.skipped, entries named like a data file that cannot be taken to listing.refused."""
    files = []
    for p in sorted(folder.iterdir()):
        if is_system(p) or p.suffix.lower() not in listing.kind.suffixes:
            listing.skipped.append(p)
        elif why := refusal(p, listing):
            listing.refused.append(f"{p.relative_to(listing.source)} ({why})")
        else:
            files.append(p)
    return files


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


def scan_folder(root: Path, split: Split, seed: int, max_file_bytes: int, kind: FileKind
                ) -> tuple[list[tuple[Path, str, str]], list[str], Listing]:
    """For a folder of class subfolders, optionally pre-split: (source file, class, split) rows,
    every class name (also of empty folders), and what was skipped or refused."""
    listing = Listing(source=root, inside=root.resolve(), max_file_bytes=max_file_bytes, kind=kind)
    top = _class_dirs(root, listing)
    if top and {p.name for p in top} <= set(SPLITS):
        if {p.name for p in top} != set(SPLITS):
            raise StageError(f"{root}: a pre-split folder needs train/, val/ and test/; "
                             f"found {', '.join(p.name for p in top)}")
        dirs = [c for s in top for c in _class_dirs(s, listing)]
        labels = _labels(dirs)
        rows = [(f, labels[c], c.parent.name) for c in dirs for f in _files_in(c, listing)]
        return rows, sorted(set(labels.values())), listing
    if not top:
        raise StageError(f"{root}: no class subfolders found")
    labels = _labels(top)
    files = [(f, labels[c]) for c in top for f in _files_in(c, listing)]
    splits = stratified_split([label for _, label in files], split, seed)
    rows = [(f, label, s) for (f, label), s in zip(files, splits)]
    return rows, sorted(labels.values()), listing


def copy_folder(root: Path, out: ShardWriter, top: str, split: Split, seed: int,
                max_file_bytes: int, kind: FileKind, key: str) -> list[str]:
    """Add the data files of the source folder `root` (params `key`) to the shards `out`, each
    with the id <top>/<split>/<class>/<name> and its path relative to `root` as its source; the
    class names. Refused and unreadable files fail the stage, all named."""
    found, classes, listing = scan_folder(root, split, seed, max_file_bytes, kind)
    if listing.refused:
        raise StageError(f"{key} {root}: refused {len(listing.refused)} entries named like "
                         f"{kind.many} (only regular files inside the folder, up to "
                         "ingest.max_file_bytes, are taken): " + "; ".join(listing.refused))
    unreadable = []
    for src, label, s in found:
        try:
            data = src.read_bytes()
        except OSError as e:  # no permission, an I/O error
            unreadable.append(f"{src.relative_to(root)} ({e.strerror or e})")
            continue
        out.add(Path(top, s, label, src.name).as_posix(), label, s,
                src.relative_to(root).as_posix(), data)
    if unreadable:
        raise StageError(f"{key} {root}: {len(unreadable)} {kind.files} cannot be read: "
                         + "; ".join(unreadable))
    if listing.skipped:
        names = sorted({p.name for p in listing.skipped})
        print(f"ingest: skipped {len(listing.skipped)} hidden, system or {kind.other} entries "
              f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    return classes
