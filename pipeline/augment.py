"""Stage 3: seeded, batched augmentation of the training split.

Every training image is kept and `copies` randomly warped versions are added. One kornia
RandomAffine does rotation, translation and zoom (the "random crop") in a single warp, with
per-sample random parameters, on the GPU when there is one (STACK.md: one combined warp is
faster than chained ops). Output, loadable without pickle:
    train.safetensors    images uint8 (N, C, S, S), labels int64 (N,)
    preprocessing.json   the Preprocessing every later consumer uses (mean/std of the train split)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.ingest import load_split
from pipeline.params import AugmentParams, load_params
from pipeline.preprocess import Preprocessing


def warp(images: torch.Tensor, rotation_deg: float, translate: float, scale_min: float,
         scale_max: float, hflip: bool) -> torch.Tensor:
    """One random affine warp per image of a float (N, C, S, S) batch in [0, 1]."""
    ops = [K.RandomAffine(degrees=rotation_deg, translate=(translate, translate),
                          scale=(scale_min, scale_max), p=1.0, padding_mode="zeros")]
    if hflip:
        ops.append(K.RandomHorizontalFlip(p=0.5))
    return K.AugmentationSequential(*ops)(images)


def augment(pixels: np.ndarray, labels: np.ndarray, p: AugmentParams,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals followed by p.copies warped copies, as uint8 on the CPU."""
    torch.manual_seed(p.seed)  # kornia draws its parameters from torch's global generator
    originals = torch.from_numpy(pixels).to(device)
    batches = [originals]
    for _ in range(p.copies):
        warped = warp(originals.float() / 255, p.rotation_deg, p.translate, p.scale_min,
                      p.scale_max, p.hflip)
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
