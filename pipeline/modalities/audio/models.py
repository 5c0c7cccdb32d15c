"""The audio model registry MODELS (audio.train.model in params.yaml) and the audio side of training:
the `models` part of the modality seam (pipeline/core/modality.py Models).

Every model takes float32 waveforms (N, clip_samples) in [-1, 1] (AudioPreprocessing.load's
output) and returns logits (N, classes). Inside, in this order:
    frontend   the log-mel front end (pipeline/modalities/audio/logmel.py: a fixed-kernel Conv1d STFT, mel
               filterbank, log; audio.train.n_fft, hop, n_mels) and a BatchNorm1d per mel band, which
               learns the bands' mean and spread (no statistics pass over the data)
    masks      SpecAugment in training mode only: audio.augment.freq_masks bands of up to
               freq_mask_bins mel bands and time_masks of up to time_mask_frames frames set to
               0 (the normalised mean), per clip; nothing in eval mode, so not in the ONNX graph
    body       one of the registry's networks on the (N, n_mels, frames) features:
    conv1d     the original idea's Conv1D network: 1-D convolutions over time with the mel bands
               as input channels (kernel 5, then 3; width, width, 2 width, 2 width channels, max
               pool 2 between), global average over time, a linear classifier
    cnn2d      a small 2-D CNN on the log-mel image: four 3x3 conv blocks (width / 4, width / 2,
               width, width channels, 2x2 max pool between), global average, a linear classifier

Waveform perturbation is the augment part's (pipeline/modalities/audio/augment.py Views): each
epoch's views are drawn from each clip's id, audio.augment.seed, the epoch and the view, so a
resumed run sees the same clips.
The SpecAugment masks draw from torch's generator, as dropout does: the train stage's
checkpoint keeps its state, so a resumed run masks as an uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.modalities.audio.logmel import LogMel, mask_bands
from pipeline.modalities.audio.preprocess import AudioPreprocessing
from pipeline.core.card import ModelCard
from pipeline.core.registry import Registry
from pipeline.core.modality import FitRecipe, fit_recipe
from pipeline.modalities.audio.config import Augment, Recipe
from pipeline.params import Params


class AudioClassifier(nn.Module):
    """waveform (N, S) -> frontend -> (masks when training) -> body -> logits (N, classes)."""

    def __init__(self, logmel: LogMel, n_mels: int, body: nn.Sequential, p: Augment):
        super().__init__()
        self.frontend = nn.Sequential(logmel, nn.BatchNorm1d(n_mels))
        self.body = body
        self.freq_masks, self.freq_mask_bins = p.freq_masks, p.freq_mask_bins
        self.time_masks, self.time_mask_frames = p.time_masks, p.time_mask_frames

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        features = self.frontend(waveform)
        if self.training:
            features = mask_bands(features, 1, self.freq_masks, self.freq_mask_bins)
            features = mask_bands(features, 2, self.time_masks, self.time_mask_frames)
        return self.body(features)

    def pruning_spec(self) -> tuple[list[nn.Module], dict[nn.Module, int]]:
        """For Torch-Pruning: the front end keeps its mel bands (its kernels and filterbank are
        buffers, no layer to prune; its BatchNorm is listed so no group reaches it) and the
        classifier keeps the class count; every conv and hidden width may shrink."""
        return [self.frontend[1], self.body[-1]], {}


def _conv1d_block(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(cout),
            nn.ReLU()]


def _conv2d_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class AsImage(nn.Module):
    """(N, n_mels, frames) -> a one-channel image (N, 1, n_mels, frames). An ONNX Unsqueeze:
    nn.Unflatten's Reshape of a computed shape stops ORT's symbolic shape inference, which
    int8 quantisation runs first."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.unsqueeze(1)


MODELS: Registry[Callable[[int, int, int], nn.Sequential]] = Registry("audio.train.model")


@MODELS.register
def conv1d(n_mels: int, classes: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        *_conv1d_block(n_mels, width, 5), nn.MaxPool1d(2),
        *_conv1d_block(width, width, 3), nn.MaxPool1d(2),
        *_conv1d_block(width, 2 * width, 3), nn.MaxPool1d(2),
        *_conv1d_block(2 * width, 2 * width, 3),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * width, classes))


@MODELS.register
def cnn2d(n_mels: int, classes: int, width: int) -> nn.Sequential:
    quarter, half = max(1, width // 4), max(1, width // 2)
    return nn.Sequential(
        AsImage(),
        *_conv2d_block(1, quarter), nn.MaxPool2d(2),
        *_conv2d_block(quarter, half), nn.MaxPool2d(2),
        *_conv2d_block(half, width), nn.MaxPool2d(2),
        *_conv2d_block(width, width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def build(name: str, prep: AudioPreprocessing, classes: int, s: Recipe) -> AudioClassifier:
    """The model `name` with the front end and width of `s` (audio's params section, or the
    recipe a card records) and its SpecAugment masks."""
    t = s.train
    logmel = LogMel(prep.sample_rate, t.n_fft, t.hop, t.n_mels)
    return AudioClassifier(logmel, t.n_mels, MODELS.get(name)(t.n_mels, classes, t.width),
                           s.augment)


# --- the Models part ---------------------------------------------------------------------------

def recipe(params: Params) -> FitRecipe:
    """audio.train's budget, lr, batch size and CUDA graphs; no channels_last (waveforms are
    (N, S))."""
    own = params.audio.train
    return fit_recipe(params.train, own, channels_last=False, cuda_graph=own.cuda_graph)


def torch_threads(params: Params) -> int | None:
    return params.audio.train.threads


def create(params: Params, prep: AudioPreprocessing, classes: int) -> nn.Module:
    return build(params.audio.train.model, prep, classes, params.audio)


def architecture(params: Params) -> str:
    return params.audio.train.model


def model_files(model: nn.Module) -> dict[str, bytes]:
    return {}


def rebuild(card: ModelCard, model_dir: Path) -> nn.Module:
    """From the card's audio section (front end sizes, width) and preprocessing."""
    return build(card.architecture, card.preprocessing, len(card.classes), card.recipe.section)
