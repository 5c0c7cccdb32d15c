"""The one definition of how an audio clip becomes model input, saved in every audio model's
card ("preprocessing") and reused by validate, augment, train, evaluate and the service: decoded
by pipeline/modalities/audio/decode.py, mono at `sample_rate`, fitted (centred) to `clip_samples`, float32
in [-1, 1]. The models compute their log-mel features themselves, so the ONNX graph takes this
waveform and the service needs no audio library beyond decoding.

Needs numpy, soundfile and soxr only: the service uses it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.modalities.audio import decode


@dataclass(frozen=True)
class AudioPreprocessing:
    sample_rate: int   # Hz the model hears (audio.preprocess.sample_rate)
    clip_samples: int  # samples per model input: audio.preprocess.clip_seconds x sample_rate

    UNIT = "clips"    # what the items are called in counts and messages (not a field)
    MODEL_FILES = ()  # files a model folder needs beside its weights (not a field)

    def to_dict(self) -> dict:
        return asdict(self)

    def load(self, source: Path | bytes, name: str | None = None) -> np.ndarray:
        """An audio file (path or bytes) -> float32 (clip_samples,): decoded, fitted.
        pipeline.core.dataset split_of reads a split's clips with it."""
        samples = decode.decode(source, self.sample_rate, name).samples
        return decode.fit(samples, self.clip_samples)


RECORD = AudioPreprocessing  # the modality seam's `preprocess` part (pipeline/core/modality.py)
