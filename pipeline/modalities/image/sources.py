"""The image modality's `sources` part (pipeline/core/modality.py, called by the ingest stage): image
sources (image.ingest.source) read into the ingested layout of pipeline/core/dataset.py:
each image an item with the id images/<split>/<class>/<name>.

    digits     built in: scikit-learn's 8x8 handwritten digits (1797, no download), as PNG
    warped_digits  built in, any size: image.ingest.warped_items 32x32 digits warped from
               those (pipeline/modalities/image/warped.py), for the scale benchmarks
    <folder>   one subfolder per class of image files (.png .jpg .jpeg .webp .bmp .tif
               .tiff .gif: pipeline/modalities/image/preprocess.py IMAGE_SUFFIXES), optionally pre-split
               into train/ val/ test/ (pipeline/core/folders.py: hidden and system files skipped,
               what cannot be taken refused by name)
    Parquet, .tar  a Parquet file or folder (what Hugging Face `datasets` exports: an `image`
               column of {bytes, path}), or WebDataset .tar shards (pipeline/core/records.py)

Files are stored byte for byte; the validate stage decodes them by their content, not their
name (a WebP saved as .jpg is read as WebP), and names those it cannot take. Without pre-split folders the
split is data.split, stratified and seeded (pipeline/core/folders.py).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import StageError
from pipeline.core import records
from pipeline.core.dataset import ShardWriter
from pipeline.core.folders import FileKind, copy_folder, stratified_split
from pipeline.modalities.image import warped
from pipeline.modalities.image.preprocess import IMAGE_SUFFIXES
from pipeline.params import Params, Split

IMAGES = FileKind(suffixes=IMAGE_SUFFIXES, one="an image", many="images", files="image files",
                  other="non-image")


def source(params: Params) -> str:
    """image.ingest.source: where the images come from."""
    return params.image.ingest.source


def ingest(params: Params, out: ShardWriter) -> list[str]:
    """Add the images of image.ingest.source to the shards `out`; return the class names."""
    if params.image.ingest.source == warped.SOURCE:
        for item in warped.warped_digits(params.image.ingest.warped_items, params.data.split,
                                         params.data.seed):
            out.add(*item)
        return [str(d) for d in range(10)]
    if (classes := records.ingest_records(params, params.image.ingest.source, out, "images",
                                          IMAGES, "image", "image.ingest.source")) is not None:
        return classes
    return ingest_images(params.image.ingest.source, out, params.data.split, params.data.seed,
                         params.ingest.max_file_bytes)


def ingest_images(source: str, out: ShardWriter, split: Split, seed: int, max_file_bytes: int
                  ) -> list[str]:
    """Add the images to the shards `out`; return the class names."""
    if source == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()  # 8x8 pixels in 0..16, bundled with scikit-learn
        labels = [str(t) for t in digits.target]
        splits = stratified_split(labels, split, seed)
        pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
        for i, (image, label, s) in enumerate(zip(pixels, labels, splits)):
            png = io.BytesIO()
            Image.fromarray(image, mode="L").save(png, format="PNG")
            out.add(f"images/{s}/{label}/{i:04d}.png", label, s, f"sklearn digits[{i}]",
                    png.getvalue())
        classes = sorted(set(labels))
    else:
        root = Path(source)
        if not root.is_dir():
            raise StageError(f"image.ingest.source: {root} is not a folder (nor 'digits')")
        classes = copy_folder(root, out, "images", split, seed, max_file_bytes, IMAGES,
                              "image.ingest.source")
    if not out.items:
        raise StageError(f"image.ingest.source: {source} holds no images "
                         f"({' '.join(sorted(IMAGE_SUFFIXES))})")
    return classes
