"""The built-in large image set, `warped_digits`: image.ingest.warped_items 32x32 grayscale
digits made from scikit-learn's 8x8 handwritten digits (no download), each one of them enlarged
and warped at random, straight into the ingested shards. For anyone to reproduce the scale
figures (bench/scale_bench.py) at any size on any machine.

Item i is drawn by its own generator, seeded with (data.seed, i): its split (data.split's
fractions), the digit it warps (one of that split's digits, so a test item never warps a digit a
train item warps) and the warp (rotation, scale, shear, shift) and noise. Item i is the same
PNG whatever the number of items, so a larger set adds items after the same ones (and new
shards after the same ones, pipeline/core/dataset.py).
"""
from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image

from pipeline.core.executor import map_items, span
from pipeline.core.folders import stratified_split
from pipeline.params import Split

SOURCE = "warped_digits"
SIZE = 32  # px, the built-in digits' model input (image.preprocess.image_size)
ROTATION_DEG, SCALE, SHEAR, SHIFT_PX, NOISE = 15.0, (0.8, 1.1), 0.15, 2.5, 12.0


def _digits(split: Split, seed: int) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """The 8x8 digits enlarged to SIZE (uint8), their labels, and the indices of each split's
    (the built-in `digits` source's stratified split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255 / 16)).astype(np.uint8)
    large = np.stack([np.asarray(Image.fromarray(d, mode="L").resize((SIZE, SIZE),
                                                                     Image.Resampling.BICUBIC))
                      for d in small])
    labels = [str(t) for t in digits.target]
    splits = np.array(stratified_split(labels, split, seed))
    return large, labels, {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}


def _warp(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random affine warp about the centre, then Gaussian noise."""
    angle = math.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    scale, shear = rng.uniform(*SCALE), rng.uniform(-SHEAR, SHEAR)
    dx, dy = rng.uniform(-SHIFT_PX, SHIFT_PX, 2)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    c = SIZE / 2  # output (x, y) -> input: rotate, shear and scale about the centre, then shift
    a, b = cos, sin + shear * cos
    d, e = -sin, cos - shear * sin
    matrix = (a, b, c - a * (c + dx) - b * (c + dy), d, e, c - d * (c + dx) - e * (c + dy))
    warped = Image.fromarray(image, mode="L").transform(
        (SIZE, SIZE), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR)
    noisy = np.asarray(warped, np.float32) + rng.normal(0, NOISE, (SIZE, SIZE))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def warped_digits(n: int, split: Split, seed: int) -> Iterator[tuple[str, str, str, str, bytes]]:
    """(id, label, split, source, PNG bytes) of items 0..n-1, in order, made in parallel
    through the executor (pipeline/core/executor.py), a round of its tasks at a time."""
    digits = (*_digits(split, seed), split, seed)
    for start in range(0, n, span()):
        yield from map_items(functools.partial(_item, digits), range(start, min(n, start + span())))


def _item(digits: tuple, i: int) -> tuple[str, str, str, str, bytes]:
    large, labels, by_split, split, seed = digits
    rng = np.random.default_rng([seed, i])
    u = rng.random()
    s = "test" if u < split.test else "val" if u < split.test + split.val else "train"
    base = int(by_split[s][rng.integers(len(by_split[s]))])
    png = io.BytesIO()
    Image.fromarray(_warp(large[base], rng), mode="L").save(png, format="PNG")
    return (f"images/{s}/{labels[base]}/{i:08d}.png", labels[base], s,
            f"warped digits[{i}] of sklearn digits[{base}]", png.getvalue())
