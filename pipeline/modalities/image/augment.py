"""Image augmentation: the `augment` part of the modality seam (pipeline/core/modality.py Augment).

The augment stage writes the preprocessing record, its mean and std measured on the train split
(read a batch at a time):
    preprocessing.json   the Preprocessing every later consumer uses
Training sees each image 1 + image.augment.copies times an epoch (Views): itself (warped too with
image.train.epoch_augment) and `copies` random warps (pipeline.modalities.image.warp: rotation,
translation and zoom, the "random crop", in one per-image affine warp), each drawn from the
image's id, image.augment.seed, the epoch and the view (pipeline/core/stream.py item_draws), on
the device that holds the images.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.dataset import split_of
from pipeline.core.stream import item_draws
from pipeline.modalities.image.config import Augment
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.modalities.image.warp import DRAWS, warp
from pipeline.params import Params


@dataclass(frozen=True)
class Views:
    """The image Augmenter (pipeline/core/modality.py): uint8 (N, C, S, S) pixels, warped into
    views, normalised by the preprocessing's mean and std into float model input."""
    prep: Preprocessing
    p: Augment
    warp_originals: bool  # image.train.epoch_augment: view 0 is warped too

    @property
    def views(self) -> int:
        return 1 + self.p.copies

    def decode(self, data: list[bytes]) -> np.ndarray:
        out = np.empty((len(data), self.prep.channels, self.prep.image_size,
                        self.prep.image_size), np.uint8)
        for i, item in enumerate(data):
            out[i] = self.prep.load(item)
        return out

    def view(self, items: torch.Tensor, keys: np.ndarray, epoch: int, view: int) -> torch.Tensor:
        if view == 0 and not self.warp_originals:
            return items
        draws = item_draws(keys, (self.p.seed, epoch, view), DRAWS)
        out = torch.empty_like(items)
        # On the CPU image.augment.chunk images at a time: their float copies stay small
        step = len(items) if items.is_cuda else self.p.chunk
        for i in range(0, len(items), step):
            warped = warp(items[i:i + step].float() / 255, self.p, draws[i:i + step])
            out[i:i + step] = (warped * 255).round_().clamp_(0, 255)
        return out

    def to_input(self, items: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.prep.mean, device=items.device).view(1, -1, 1, 1)
        std = torch.tensor(self.prep.std, device=items.device).view(1, -1, 1, 1)
        return (items.float() / 255 - mean) / std


def augmenter(params: Params, prep: Preprocessing, folder: Path) -> Views:
    return Views(prep, params.image.augment, params.image.train.epoch_augment)


def write_augmented(data: Path, out: Path, params: Params) -> str:
    """preprocessing.json: image.preprocess with the train split's per-channel mean and std."""
    own = params.image.preprocess
    raw = Preprocessing(image_size=own.image_size, channels=own.channels,
                        mean=[0.0] * own.channels, std=[1.0] * own.channels,
                        background=own.background)
    total = np.zeros(own.channels)
    squares = np.zeros(own.channels)
    n = 0
    for pixels, _ in split_of(data, "train", raw).batches(8192):
        scaled = pixels.astype(np.float64) / 255
        total += scaled.sum(axis=(0, 2, 3))
        squares += np.square(scaled).sum(axis=(0, 2, 3))
        n += scaled.shape[0] * scaled.shape[2] * scaled.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0))
    prep = dataclasses.replace(raw, mean=mean.round(6).tolist(), std=std.round(6).tolist())
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    p = params.image.augment
    views = "a warp of each" if params.image.train.epoch_augment else "each as it is"
    return (f"{n // own.image_size ** 2} training images, mean {prep.mean} std {prep.std}; "
            f"training sees {views} and {p.copies} warped copies per epoch")
