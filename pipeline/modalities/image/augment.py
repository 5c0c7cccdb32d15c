"""Image augmentation: the `augment` part of the modality seam (pipeline/core/modality.py Augment).

Every training image is kept and image.augment.copies randomly warped versions are added by
pipeline.modalities.image.warp (rotation, translation and zoom, the "random crop", in one per-sample affine
warp), on the GPU when there is one. Output, loadable without pickle:
    train.safetensors    images uint8 (N, C, S, S), labels int64 (N,)
    preprocessing.json   the Preprocessing every later consumer uses (mean/std of the train split)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.core.dataset import load_split
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.modalities.image.warp import warp
from pipeline.modalities.image.config import Augment
from pipeline.params import Params


def augment_pixels(pixels: np.ndarray, labels: np.ndarray, p: Augment,
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


def write_augmented(data: Path, out: Path, params: Params) -> str:
    own = params.image.preprocess
    raw = Preprocessing(image_size=own.image_size, channels=own.channels,
                        mean=[0.0] * own.channels, std=[1.0] * own.channels,
                        background=own.background)
    pixels, labels = load_split(data, "train", raw)
    scaled = pixels.astype(np.float64) / 255
    prep = dataclasses.replace(raw, mean=scaled.mean(axis=(0, 2, 3)).round(6).tolist(),
                               std=scaled.std(axis=(0, 2, 3)).round(6).tolist())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, all_labels = augment_pixels(pixels, labels, params.image.augment, device)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": all_labels.contiguous()},
              out / "train.safetensors")
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    return (f"{len(pixels)} training images -> {len(images)} on {device}; "
            f"mean {prep.mean} std {prep.std}")

