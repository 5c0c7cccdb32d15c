"""The log-mel front end every audio model starts with (pipeline/modalities/audio/models.py), inside the
model so that the exported ONNX graph takes the raw waveform and the service needs no audio
library beyond decoding.

    waveform (N, S) -> STFT -> power -> mel filterbank -> log -> (N, n_mels, frames)

The STFT is a Conv1d with fixed kernels (the Hann-windowed cosine and sine of each FFT bin),
stride hop, zero-padded by n_fft / 2 on both sides: torch.stft(center=True, pad_mode="constant")
frame for frame (tests/test_audio_model.py), exported as one ONNX Conv rather than opset 17's
STFT op. Its kernels and the filterbank are buffers, not parameters: no optimiser step or
pruning pass touches them, and a model rebuilt from its card recomputes them (they are not in
the weights file). int8 leaves them in float (pipeline/modalities/audio/export.py says why).

Hand-written rather than torchaudio's MelSpectrogram: torchaudio has no build for torch 2.13
(../shared/STACK.md) and librosa would bring numba (~426 MB) for one filterbank.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Added to the mel power before the log: with n_fft 400, a 1 kHz tone at -60 dBFS RMS
# (audio.preprocess.silent_rms) has a peak mel power of 0.02, 43 dB above the floor, so the floor shapes
# digital silence (the centred padding: log(1e-6) = -13.8 instead of -inf), not speech.
POWER_FLOOR = 1e-6


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """HTK's mel scale."""
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """float32 (n_mels, n_fft // 2 + 1): triangular filters with centres equally spaced on the
    mel scale from 0 Hz to sample_rate / 2, peak 1, unnormalised (torchaudio's melscale_fbanks
    with mel_scale="htk", norm=None)."""
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(0, hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0, None).astype(np.float32)


def stft_kernels(n_fft: int) -> np.ndarray:
    """float32 (2 * (n_fft // 2 + 1), 1, n_fft): the real parts' kernels (window x cos) of bins
    0..n_fft/2, then the imaginary parts' (-window x sin), as Conv1d weights. The window is
    torch.hann_window's (periodic)."""
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    angle = 2 * np.pi * k * n / n_fft
    return np.concatenate([window * np.cos(angle), -window * np.sin(angle)])[:, None, :] \
        .astype(np.float32)


class LogMel(nn.Module):
    """float32 waveform (N, S) -> log mel power (N, n_mels, 1 + S // hop)."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int):
        super().__init__()
        self.n_fft, self.hop, self.bins = n_fft, hop, n_fft // 2 + 1
        self.register_buffer("kernels", torch.from_numpy(stft_kernels(n_fft)), persistent=False)
        self.register_buffer("filterbank", torch.from_numpy(
            mel_filterbank(sample_rate, n_fft, n_mels)), persistent=False)

    def power(self, waveform: torch.Tensor) -> torch.Tensor:
        """|STFT|^2, float32 (N, n_fft // 2 + 1, frames): the convolution, or in training mode
        torch.stft's FFT, the same frames (they agree to float32 rounding) at a quarter of the
        time (docs/benchmarks.md, Audio)."""
        if self.training:
            window = torch.hann_window(self.n_fft, device=waveform.device)
            return torch.stft(waveform, self.n_fft, self.hop, window=window, center=True,
                              pad_mode="constant", return_complex=True).abs().square()
        spectrum = F.conv1d(waveform.unsqueeze(1), self.kernels, stride=self.hop,
                            padding=self.n_fft // 2)
        real, imag = spectrum[:, :self.bins], spectrum[:, self.bins:]
        return real * real + imag * imag

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.matmul(self.filterbank, self.power(waveform)) + POWER_FLOOR)


def mask_bands(features: torch.Tensor, dim: int, masks: int, max_width: int) -> torch.Tensor:
    """SpecAugment (Park et al. 2019): `masks` bands along `dim` (1: mel bands, 2: frames) of
    each example set to 0, each of a width uniform in 0..max_width at a uniform start; drawn
    from torch's generator, per example."""
    if masks == 0 or max_width == 0:
        return features
    n, size = features.shape[0], features.shape[dim]
    draw = torch.rand(2, n, masks, 1, device=features.device)
    width = (draw[0] * (max_width + 1)).floor().clamp(max=size)
    start = (draw[1] * (size - width + 1)).floor()
    position = torch.arange(size, device=features.device)
    band = ((position >= start) & (position < start + width)).any(1)  # (N, size)
    return features.masked_fill(band.unsqueeze(3 - dim), 0.0)
