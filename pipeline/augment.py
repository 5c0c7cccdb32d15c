"""Stage 3: seeded, batched augmentation of the training split.

Every training image is kept and `copies` randomly warped versions are added. One affine warp
(a bilinear grid_sample) does rotation, translation and zoom (the "random crop") at once, with
per-sample random parameters, on the GPU when there is one (STACK.md: one combined warp is
faster than chained ops). Output, loadable without pickle:
    train.safetensors    images uint8 (N, C, S, S), labels int64 (N,)
    preprocessing.json   the Preprocessing every later consumer uses (mean/std of the train split)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.ingest import load_split
from pipeline.params import AugmentParams, load_params
from pipeline.preprocess import Preprocessing


def warp(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """One random affine warp per image of a float (N, C, S, S) batch in [0, 1]: rotation about
    the centre, zoom and shift (and a mirror for half of them when p.hflip), drawn per image from
    torch's generator and applied by one bilinear grid_sample (zeros outside).

    The sampling grid is built here in closed form: F.affine_grid's batched matmul took 3x as
    long as the sampling itself on 2 CPU cores. On the CPU the images go through in chunks of
    p.chunk, whose grid stays in cache (fresh multi-MB tensors per call cost page faults); on
    a GPU, in one go. The random draws come first, so the output does not depend on p.chunk.
    """
    n, _, h, w = images.shape
    device = images.device
    angle = torch.empty(n, device=device).uniform_(-p.rotation_deg, p.rotation_deg).deg2rad()
    scale = torch.empty(n, device=device).uniform_(p.scale_min, p.scale_max)
    shift = torch.empty(n, 2, device=device).uniform_(-p.translate, p.translate)  # side fraction
    mirror = (torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if p.hflip
              else torch.ones(n, device=device))
    # In pixels about the centre, destination = A source + shift with A = rotate zoom mirror_x.
    # grid_sample wants, per destination pixel, its source in coordinates normalised to
    # [-1, 1] (x 2/w, y 2/h): source = M destination + b, M = D A^-1 D^-1, b = -M D shift.
    cos, sin = angle.cos() / scale, angle.sin() / scale
    m = torch.stack([cos * mirror, sin * mirror * (h / w), -sin * (w / h), cos], 1)  # M row-major
    shift = shift * 2  # D shift: a fraction of the side is twice that in normalised units
    b = -torch.stack([m[:, 0] * shift[:, 0] + m[:, 1] * shift[:, 1],
                      m[:, 2] * shift[:, 0] + m[:, 3] * shift[:, 1]], 1)
    coefficients = torch.cat([m, b], 1).to(images.dtype)[:, :, None, None]  # (n, 6, 1, 1)
    xs = (torch.arange(w, device=device, dtype=images.dtype) * 2 + 1) / w - 1  # pixel centres
    ys = ((torch.arange(h, device=device, dtype=images.dtype) * 2 + 1) / h - 1)[:, None]
    out = torch.empty_like(images)
    step = max(n, 1) if images.is_cuda else p.chunk
    for i in range(0, n, step):
        m00, m01, m10, m11, bx, by = coefficients[i:i + step].unbind(1)  # each (k, 1, 1)
        grid = torch.stack([m00 * xs + (m01 * ys + bx), m10 * xs + (m11 * ys + by)], -1)
        out[i:i + step] = F.grid_sample(images[i:i + step], grid, mode="bilinear",
                                        padding_mode="zeros", align_corners=False)
    return out


def augment(pixels: np.ndarray, labels: np.ndarray, p: AugmentParams,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals followed by p.copies warped copies, as uint8 on the CPU."""
    torch.manual_seed(p.seed)  # warp draws its parameters from torch's global generator
    originals = torch.from_numpy(pixels).to(device)
    batches = [originals]
    for _ in range(p.copies):
        warped = warp(originals.float() / 255, p)
        batches.append((warped * 255).round().clamp(0, 255).to(torch.uint8))
    images = torch.cat(batches).cpu()
    return images, torch.from_numpy(labels).repeat(p.copies + 1)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline augment")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    raw = Preprocessing(image_size=params.data.image_size, channels=params.data.channels,
                        mean=[0.0] * params.data.channels, std=[1.0] * params.data.channels)
    pixels, labels = load_split(args.data, "train", raw)
    scaled = pixels.astype(np.float64) / 255
    prep = Preprocessing(image_size=raw.image_size, channels=raw.channels,
                         mean=scaled.mean(axis=(0, 2, 3)).round(6).tolist(),
                         std=scaled.std(axis=(0, 2, 3)).round(6).tolist())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, all_labels = augment(pixels, labels, params.augment, device)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": all_labels.contiguous()},
              args.out / "train.safetensors")
    (args.out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    print(f"augment: {len(pixels)} training images -> {len(images)} on {device}; "
          f"mean {prep.mean} std {prep.std}")
