"""Audio augmentation, the `augment` part of the modality seam (pipeline/core/modality.py Augment):
the decoded training clips and audio.augment.copies perturbed copies of each
(pipeline/modalities/audio/perturb.py: speed, shift, gain, noise), drawn from one generator seeded by
audio.augment.seed, on the GPU when there is one. With audio.augment.per_epoch the train stage
draws new perturbations every epoch instead (pipeline/modalities/audio/models.py), so copies can stay 0.

Output (data/augmented, the issue-13 contract):
    train.safetensors    waveforms float32 (N, clip_samples) in [-1, 1], originals first, then
                         the copies; labels int64 (N,)
    preprocessing.json   AudioPreprocessing.to_dict()
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.modalities.audio.decode import clip_length
from pipeline.modalities.audio.perturb import generator, perturb
from pipeline.modalities.audio.preprocess import AudioPreprocessing
from pipeline.core.dataset import load_split
from pipeline.modalities.audio.config import Preprocess, Recipe
from pipeline.params import Params


def preprocessing(p: Preprocess) -> AudioPreprocessing:
    return AudioPreprocessing(sample_rate=p.sample_rate,
                              clip_samples=clip_length(p.sample_rate, p.clip_seconds))


def augment_waves(waves: torch.Tensor, s: Recipe) -> torch.Tensor:
    """(N, S) clips -> (N * (1 + copies), S): the originals, then s.augment.copies perturbed
    copies, the same for the same s.augment.seed."""
    g = generator(s.augment.seed, waves.device)
    copies = [perturb(waves, s.augment, s.preprocess.sample_rate, g)
              for _ in range(s.augment.copies)]
    return torch.cat([waves, *copies])


def write_augmented(data: Path, out: Path, params: Params) -> str:
    """Decoded and augmented train split and the preprocessing record into `out`; a summary."""
    p = params.audio
    prep = preprocessing(p.preprocess)
    waves, labels = load_split(data, "train", prep)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_waves = augment_waves(torch.from_numpy(waves).to(device), p).cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file({"waveforms": all_waves.contiguous(),
               "labels": torch.from_numpy(labels).repeat(p.augment.copies + 1).contiguous()},
              out / "train.safetensors")
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    epochs = "new perturbations every epoch" if p.augment.per_epoch else "no per-epoch draws"
    return (f"{len(waves)} training clips -> {len(all_waves)} ({p.augment.copies} perturbed "
            f"copies each) on {device}, {prep.clip_samples} samples at {prep.sample_rate} Hz; "
            f"{epochs}")
