"""Audio augmentation, the `augment` part of the modality seam (pipeline/core/modality.py Augment).

The augment stage writes the preprocessing record (audio.preprocess's rate and clip length, no
statistics of the data: the models' band norms learn them):
    preprocessing.json   AudioPreprocessing.to_dict()
Training sees each clip 1 + audio.augment.copies times an epoch (Views): itself (perturbed too
with audio.augment.per_epoch) and `copies` perturbed copies (pipeline/modalities/audio/perturb.py:
speed, shift, gain, noise), each drawn from the clip's id, audio.augment.seed, the epoch and the
view (pipeline/core/stream.py item_draws, and item_rng for the noise samples), on the device that
holds the clips.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.dataset import split_of
from pipeline.core.stream import item_draws, item_rng
from pipeline.modalities.audio.config import Augment, Preprocess
from pipeline.modalities.audio.decode import clip_length
from pipeline.modalities.audio.perturb import DRAWS, perturb
from pipeline.modalities.audio.preprocess import AudioPreprocessing
from pipeline.params import Params


def preprocessing(p: Preprocess) -> AudioPreprocessing:
    return AudioPreprocessing(sample_rate=p.sample_rate,
                              clip_samples=clip_length(p.sample_rate, p.clip_seconds))


@dataclass(frozen=True)
class Views:
    """The audio Augmenter (pipeline/core/modality.py): float32 (N, clip_samples) waveforms in
    [-1, 1], perturbed into views; the models take them as they are."""
    prep: AudioPreprocessing
    p: Augment

    @property
    def views(self) -> int:
        return 1 + self.p.copies

    def decode(self, data: list[bytes]) -> np.ndarray:
        out = np.empty((len(data), self.prep.clip_samples), np.float32)
        for i, item in enumerate(data):
            out[i] = self.prep.load(item)
        return out

    def view(self, items: torch.Tensor, keys: np.ndarray, epoch: int, view: int) -> torch.Tensor:
        if view == 0 and not self.p.per_epoch:
            return items
        salt = (self.p.seed, epoch, view)
        noise = np.empty(items.shape, dtype=np.float32)
        for row, key in zip(noise, keys):
            item_rng(key, salt).standard_normal(dtype=np.float32, out=row)
        return perturb(items, self.p, self.prep.sample_rate, item_draws(keys, salt, DRAWS),
                       torch.from_numpy(noise).to(items.device))

    def to_input(self, items: torch.Tensor) -> torch.Tensor:
        return items


def augmenter(params: Params, prep: AudioPreprocessing, folder: Path) -> Views:
    return Views(prep, params.audio.augment)


def write_augmented(data: Path, out: Path, params: Params) -> str:
    """preprocessing.json: audio.preprocess's rate and clip length. The train split is only
    counted (its label column; none is an error naming the manifest), not decoded."""
    p = params.audio
    prep = preprocessing(p.preprocess)
    clips = len(split_of(data, "train", prep))
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    views = "a perturbation of each" if p.augment.per_epoch else "each as it is"
    return (f"{clips} training clips of {prep.clip_samples} samples at {prep.sample_rate} Hz; "
            f"training sees {views} and {p.augment.copies} perturbed copies per epoch")
