"""Stage 1: materialise the data set as files plus a manifest (pipeline/dataset.py has the
layout): images from data.source, or with data.modality text, texts from text.source
(pipeline/text/sources.py). classes.json lists every class folder, also one without files, so the
validate stage can name it; a manifest row's source is relative to the source folder.

What a source folder may hold, what is skipped and what is refused: pipeline/folders.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import StageError
from pipeline.dataset import SPLITS, write_manifest
from pipeline.folders import FileKind, copy_folder, stratified_split
from pipeline.params import Split, load_params

IMAGES = FileKind(suffixes=frozenset({".png", ".jpg", ".jpeg"}), one="an image", many="images",
                  files="image files", other="non-image")


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
        if not root.is_dir():
            raise StageError(f"data.source: {root} is not a folder (nor 'digits')")
        rows, classes = copy_folder(root, out, "images", split, seed, max_file_bytes, IMAGES,
                                    "data.source")
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
    if p.modality == "text":
        from pipeline.text.sources import ingest_texts
        source, what = params.text.source, "texts"
        rows = ingest_texts(source, args.out, p.split, p.seed, params.ingest.max_file_bytes,
                            params.text.per_class)
    else:
        source, what = p.source, "images"
        rows = ingest(p.source, args.out, p.split, p.seed, params.ingest.max_file_bytes)
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    print(f"ingest: {len(rows)} {what} from {source}: {counts}")
