"""The image modality's `sources` part (pipeline/core/modality.py, called by the ingest stage): image
sources (image.ingest.source) read into the ingested layout of pipeline/core/dataset.py:
images/<split>/<class>/<name>, with manifest.csv and classes.json.

    digits     built in: scikit-learn's 8x8 handwritten digits (1797, no download), as PNG
    <folder>   one subfolder per class of image files (.png .jpg .jpeg .webp .bmp .tif
               .tiff .gif: pipeline/modalities/image/preprocess.py IMAGE_SUFFIXES), optionally pre-split
               into train/ val/ test/ (pipeline/core/folders.py: hidden and system files skipped,
               what cannot be taken refused by name)

Files are copied byte for byte; the validate stage decodes them by their content, not their
name (a WebP saved as .jpg is read as WebP), and names those it cannot take. Without pre-split folders the
split is data.split, stratified and seeded (pipeline/core/folders.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import StageError
from pipeline.core.dataset import write_manifest
from pipeline.core.folders import FileKind, copy_folder, stratified_split
from pipeline.modalities.image.preprocess import IMAGE_SUFFIXES
from pipeline.params import Params, Split

IMAGES = FileKind(suffixes=IMAGE_SUFFIXES, one="an image", many="images", files="image files",
                  other="non-image")


def source(params: Params) -> str:
    """image.ingest.source: where the images come from."""
    return params.image.ingest.source


def ingest(params: Params, out: Path) -> list[dict]:
    """Write the images of image.ingest.source, manifest.csv and classes.json under `out`; return the
    manifest rows."""
    return ingest_images(params.image.ingest.source, out, params.data.split, params.data.seed,
                         params.ingest.max_file_bytes)


def ingest_images(source: str, out: Path, split: Split, seed: int, max_file_bytes: int
                  ) -> list[dict]:
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
            raise StageError(f"image.ingest.source: {root} is not a folder (nor 'digits')")
        rows, classes = copy_folder(root, out, "images", split, seed, max_file_bytes, IMAGES,
                                    "image.ingest.source")
    if not rows:
        raise StageError(f"image.ingest.source: {source} holds no images "
                         f"({' '.join(sorted(IMAGE_SUFFIXES))})")
    write_manifest(out, rows, classes)
    return rows
