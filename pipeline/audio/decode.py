"""The one definition of how an audio file becomes samples: decoded, mixed to mono, resampled to
the model's rate and fitted to its clip length. Ingest's checks, validate, training and the
service all decode through here, so the model is served what it was trained on.

Accepted: WAV (also WAVE_FORMAT_EXTENSIBLE and RF64), FLAC and Ogg (Vorbis or Opus), at any
sample rate, channel count and sample format libsndfile decodes (8-bit unsigned or signed PCM,
16/24/32-bit PCM, float, mu-law, A-law, ADPCM). Refused, with AudioError naming the file and the
cause: an empty file, bytes libsndfile cannot decode (corrupt, or not audio), a container other
than those three, a name whose extension says another container than the bytes hold, a file
with no samples, non-finite float samples, and (with max_seconds) a file longer than that,
refused from its header before any sample is read.

Decoded, not refused: 8-bit, stereo or more channels, any rate (96 kHz, 8 kHz), silence and
clipping. Those are properties of a recording, not errors in it; Decoded reports them (source
format, rate, channels, duration, clipped share, RMS) for the validate stage, which bounds
duration, clipping and silent shares per data set, and for the service, which answers a silent
or too long upload with a 4xx. Duplicates and cross-split leakage are validate's as well (a hash
of the decoded samples finds a WAV and its FLAC copy alike).

Resampling is libsoxr's (the `soxr` package, "HQ", its default), not scipy's resample_poly:
measured (docs/benchmarks.md, Audio) 4-42x faster per 1 s clip, a 9 kHz tone aliased into a
16 kHz output at -141 dB against resample_poly's -31 dB, and any rate pair costs about the same
(44,056 to 16,000 Hz: 0.9 ms vs 39 ms); soxr imports in 0.2 s and installs 0.5 MB, scipy.signal
1.9 s and 113 MB (the Bento has no scipy).

Needs only numpy, soundfile (libsndfile is inside its wheel) and soxr: the service uses it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

# extension -> the containers (libsndfile's format names) a file so named may hold
CONTAINERS = {".wav": ("WAV", "WAVEX", "RF64"), ".flac": ("FLAC",), ".ogg": ("OGG",),
              ".opus": ("OGG",)}
AUDIO_SUFFIXES = frozenset(CONTAINERS)
# The largest magnitude each integer sample format holds, as libsndfile reads it to float (its
# negative full scale is -1.0): a sample at either end is clipped. Other formats (float, Vorbis,
# Opus, mu-law, A-law, ADPCM) count magnitudes >= 1.0.
_FULL_SCALE = {"PCM_S8": 1 - 2.0 ** -7, "PCM_U8": 1 - 2.0 ** -7, "PCM_16": 1 - 2.0 ** -15,
               "PCM_24": 1 - 2.0 ** -23, "PCM_32": 1 - 2.0 ** -31}


class AudioError(ValueError):
    """An audio file or upload that cannot be taken; the message names it and the cause."""


@dataclass(frozen=True)
class Decoded:
    """A decoded recording: mono samples at the requested rate, and what the source was."""
    samples: np.ndarray   # float32 (n,) in [-1, 1], at sample_rate, the source's whole length
    sample_rate: int      # Hz, as requested
    source_rate: int      # Hz, the file's
    channels: int         # the file's, mixed to mono by their mean
    format: str           # libsndfile's container name: WAV, WAVEX, RF64, FLAC, OGG
    subtype: str          # libsndfile's sample format: PCM_16, PCM_U8, FLOAT, VORBIS, ...
    seconds: float        # the file's duration
    clipped: float        # share of the file's samples (all channels) at or beyond full scale
    rms: float            # root mean square of `samples`, 0..1 (a silent clip is near 0)


def clip_length(sample_rate: int, clip_seconds: float) -> int:
    """Samples in one model input."""
    return round(sample_rate * clip_seconds)


def fit(samples: np.ndarray, length: int) -> np.ndarray:
    """`samples` centred in `length`: padded with silence on both sides, or cut on both sides,
    so a word recorded with some lead-in or tail stays in the window."""
    n = len(samples)
    if n >= length:
        start = (n - length) // 2
        return np.ascontiguousarray(samples[start:start + length], dtype=np.float32)
    out = np.zeros(length, dtype=np.float32)
    start = (length - n) // 2
    out[start:start + n] = samples
    return out


def decode(source: Path | bytes, sample_rate: int, name: str | None = None,
           max_seconds: float | None = None) -> Decoded:
    """Decode a file (a path) or its bytes to mono float32 at `sample_rate` Hz.

    `name` is what messages call it (a path: the path) and whose extension must agree with the
    bytes (bytes without a name: any accepted container). With `max_seconds`, a longer file is
    refused from its header, before its samples are read (the service's bound on an upload)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        where, named = name or "audio", name
        size = len(source)
        opened = io.BytesIO(source)
    else:
        where = named = name or str(source)
        try:
            size = Path(source).stat().st_size
        except OSError as e:
            raise AudioError(f"{where}: cannot be read ({e.strerror or e})") from None
        opened = source
    suffix = Path(named).suffix.lower() if named else ""
    if suffix and suffix not in CONTAINERS:
        raise AudioError(f"{where}: extension {suffix!r} is not an accepted audio file "
                         f"(accepted: {', '.join(CONTAINERS)})")
    if size == 0:
        raise AudioError(f"{where}: empty (0 bytes)")
    try:
        with soundfile.SoundFile(opened) as f:
            container, subtype = f.format, f.subtype
            source_rate, channels, frames = f.samplerate, f.channels, f.frames
            _check_container(where, suffix, container)
            if source_rate <= 0 or channels <= 0:
                raise AudioError(f"{where}: corrupt header ({source_rate} Hz, {channels} "
                                 "channels)")
            if max_seconds is not None and frames / source_rate > max_seconds:
                raise AudioError(f"{where}: {frames / source_rate:.2f} s long, over the "
                                 f"{max_seconds:g} s allowed")
            audio = f.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise AudioError(f"{where}: cannot be decoded: {e.error_string.rstrip('.')} (corrupt, "
                         "or not WAV, FLAC or Ogg audio)") from None
    except (RuntimeError, soundfile.SoundFileError) as e:  # an error while reading frames
        raise AudioError(f"{where}: cannot be decoded: {e} (corrupt)") from None
    if audio.size == 0:
        raise AudioError(f"{where}: holds no samples ({container} {subtype}, 0 frames)")
    if not np.isfinite(audio).all():
        raise AudioError(f"{where}: holds non-finite samples (NaN or infinity; {container} "
                         f"{subtype})")
    full_scale = _FULL_SCALE.get(subtype, 1.0)
    clipped = np.count_nonzero(np.abs(audio) >= full_scale) / audio.size
    mono = audio.mean(axis=1, dtype=np.float32) if channels > 1 else audio[:, 0]
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate)
    if mono.size == 0:
        raise AudioError(f"{where}: {len(audio)} samples at {source_rate} Hz, shorter than one "
                         f"sample at {sample_rate} Hz")
    mono = np.clip(mono, -1.0, 1.0)  # float files, and resampling near full scale, overshoot
    return Decoded(samples=mono, sample_rate=sample_rate, source_rate=source_rate,
                   channels=channels, format=container, subtype=subtype,
                   seconds=len(audio) / source_rate, clipped=clipped,
                   rms=float(np.sqrt(np.mean(np.square(mono, dtype=np.float64)))))


def _check_container(where: str, suffix: str, container: str) -> None:
    """The container is one Kiln takes, and the one the file's extension names (if it has one)."""
    accepted = {c for containers in CONTAINERS.values() for c in containers}
    if container not in accepted:
        raise AudioError(f"{where}: {container} audio is not accepted (accepted: WAV, FLAC, Ogg "
                         "Vorbis or Opus)")
    if suffix and container not in CONTAINERS[suffix]:
        raise AudioError(f"{where}: holds {container} audio, but its extension {suffix!r} says "
                         f"{CONTAINERS[suffix][0]}: rename it")
