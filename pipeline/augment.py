"""Stage 3: seeded, batched augmentation of the training split.

Every training image is kept and `copies` randomly warped versions are added by pipeline.image.warp
(rotation, translation and zoom, the "random crop", in one per-sample affine warp), on the GPU
when there is one. Output, loadable without pickle:
    train.safetensors    images uint8 (N, C, S, S), labels int64 (N,)
    preprocessing.json   the Preprocessing every later consumer uses (mean/std of the train split)
With data.modality text, pipeline/text/augment.py does the same on token ids.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.dataset import load_split
from pipeline.params import AugmentParams, load_params
from pipeline.image.preprocess import Preprocessing
from pipeline.text.augment import write_augmented
from pipeline.image.warp import warp


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
    if params.data.modality == "text":
        print(f"augment: {write_augmented(args.data, args.out, params.text)}")
        return
    raw = Preprocessing(image_size=params.data.image_size, channels=params.data.channels,
                        mean=[0.0] * params.data.channels, std=[1.0] * params.data.channels,
                        background=params.data.background)
    pixels, labels = load_split(args.data, "train", raw)
    scaled = pixels.astype(np.float64) / 255
    prep = dataclasses.replace(raw, mean=scaled.mean(axis=(0, 2, 3)).round(6).tolist(),
                               std=scaled.std(axis=(0, 2, 3)).round(6).tolist())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, all_labels = augment(pixels, labels, params.augment, device)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": all_labels.contiguous()},
              args.out / "train.safetensors")
    (args.out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    print(f"augment: {len(pixels)} training images -> {len(images)} on {device}; "
          f"mean {prep.mean} std {prep.std}")
