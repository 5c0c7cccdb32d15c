"""The audio modality's serving part (pipeline/core/modality.py Serving): what pipeline/serving/service.py and
pipeline/serving/oip.py do with an audio model's requests.

An upload to /classify_audio (a WAV, FLAC, Ogg, MP3, M4A or AAC file, any rate and channel
count) is decoded by pipeline/modalities/audio/decode.py, the module training read its clips with, with
audio.serve.max_seconds as its bound (a longer file is refused from its header, before its
samples are read; an ADTS stream, which has no length in a header, once decoding passes it),
and fitted to the card's clip length (AudioPreprocessing): the model is served what it was trained on,
never a second copy of it. The file's name only has to end in an accepted extension (or none);
its bytes decide the container, so a FLAC named .wav is decoded as FLAC. M4A and AAC uploads
are decoded by FFmpeg's AAC decoder (PyAV), as training decoded such clips: a model trained on
phone recordings takes them as recorded.

gRPC ModelInfer takes that model input itself: FP32 `waveform` [N, clip_samples], mono at the
card's sample rate, values in [-1, 1] (what AudioPreprocessing.load returns).

Refused, with ValueError naming the field and the cause (HTTP 400, gRPC INVALID_ARGUMENT): a
file of another format, empty, undecodable or over audio.serve.max_seconds; a waveform of
another datatype or shape, non-finite or outside [-1, 1]; and silence: a clip whose model input
has an RMS below the card's audio.preprocess.silent_rms (the key validate counts silent clips by), whether
it came as a file or a waveform, so both protocols refuse the same clips. Endpoints of another
modality answer TAKES (pipeline/serving/service.py).

Needs numpy, soundfile, soxr and av only: the Bento has no torch.
"""
from __future__ import annotations

import io
from pathlib import PurePath
from typing import TYPE_CHECKING

import numpy as np
import soundfile

from pipeline.modalities.audio import decode
from pipeline.serving.oip import input_tensor, shape_of

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.core.card import BentoArgs, ModelCard

SERVES = "an audio model"
# What a request to another modality's endpoint is told (after its field's name).
TAKES = f"this server serves {SERVES}; send a {decode.ACCEPTED} file to /classify_audio"
GRPC_INPUT = "waveform"  # ModelInfer's one input tensor, FP32 [N, clip_samples]
EXAMPLE_HZ, EXAMPLE_PEAK = 440.0, 0.1  # the self-check's clip: a tone, -20 dBFS, far from silent


def model_input(folder: Path, card: ModelCard):
    """Checked waveforms (float32 (N, clip_samples)) are the model's input as they are: the
    log-mel front end is inside the ONNX graph."""
    return lambda waveforms: np.ascontiguousarray(waveforms, dtype=np.float32)


def example(card: ModelCard) -> np.ndarray:
    """One clip of a tone at the card's rate and length."""
    p = card.preprocessing
    t = np.arange(p.clip_samples) / p.sample_rate
    return (EXAMPLE_PEAK * np.sin(2 * np.pi * EXAMPLE_HZ * t)).astype(np.float32)[None]


def api_fields(card: ModelCard, args: BentoArgs) -> dict[str, dict]:
    return {}  # /classify_audio takes a file: no JSON field


def _refuse_silent(waveforms: np.ndarray, card: ModelCard, name) -> None:
    """ValueError naming (name(i)) the first clip whose RMS is below the card's
    audio.preprocess.silent_rms."""
    threshold = card.recipe.section.preprocess.silent_rms
    rms = np.sqrt(np.mean(np.square(waveforms, dtype=np.float64), axis=1))
    quiet = np.flatnonzero(rms < threshold)
    if quiet.size:
        i = int(quiet[0])
        raise ValueError(f"{name(i)}: silent (RMS {rms[i]:.2g}, below the model's "
                         f"audio.preprocess.silent_rms {threshold:g}); send a recording with sound")


def audio(upload, card: ModelCard, args: BentoArgs) -> np.ndarray:
    """/classify_audio's "audio" (the uploaded file, or its bytes) -> float32 (1, clip_samples):
    decoded, mono, resampled, fitted, not silent. Raises ValueError starting "audio: "."""
    name = getattr(upload, "filename", None) or ""
    suffix = PurePath(name).suffix.lower()
    if suffix and suffix not in decode.AUDIO_SUFFIXES:
        raise ValueError(f"audio: a {suffix} file; send {decode.ACCEPTED} audio "
                         f"({', '.join(sorted(decode.AUDIO_SUFFIXES))})")
    data = upload if isinstance(upload, bytes) else upload.file.read()
    p = card.preprocessing
    try:
        decoded = decode.decode(data, p.sample_rate, name=None,
                                max_seconds=args.limits.max_seconds)
    except decode.AudioError as e:  # its message starts "audio: " (name None)
        raise ValueError(str(e)) from None
    clip = decode.fit(decoded.samples, p.clip_samples)[None]
    _refuse_silent(clip, card, lambda i: "audio")
    return clip


def audio_head(head: bytes, card: ModelCard, args: BentoArgs) -> str | None:
    """Why an upload whose first bytes already hold more than audio.serve.max_seconds is
    refused, or None (anything else is left to `audio`). libsndfile counts a WAV's frames up to
    the bytes present and a FLAC's from its header, never more than the file holds."""
    try:
        with soundfile.SoundFile(io.BytesIO(head)) as f:
            seconds = f.frames / f.samplerate if f.samplerate > 0 else 0.0
    except soundfile.SoundFileError:  # not audio libsndfile reads, or a damaged header
        return None
    if seconds > args.limits.max_seconds:
        return (f"audio: at least {seconds:.2f} s long, over the {args.limits.max_seconds:g} s "
                "allowed")
    return None


def waveforms(values: np.ndarray, card: ModelCard, name: str) -> np.ndarray:
    """Clips (N, clip_samples) whose values are finite, within [-1, 1] and not all silent, as
    float32; ValueError naming `name` otherwise."""
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: holds non-finite values (NaN or infinity)")
    peak = float(np.abs(values).max())
    if peak > 1.0:
        raise ValueError(f"{name}: values outside [-1, 1] (largest magnitude {peak:.3g}); send "
                         "samples at full scale 1")
    _refuse_silent(values, card, lambda i: f"{name}[{i}]")
    return values.astype(np.float32, copy=False)


def grpc_input(request, card: ModelCard, args: BentoArgs) -> np.ndarray:
    """The request's one input tensor "waveform" (FP32 [N, clip_samples], 1 <= N <=
    serve.max_batch_items, raw little-endian bytes or contents.fp32_contents) as float32
    (N, clip_samples), its shape checked before its values are read, then `waveforms`."""
    p = card.preprocessing
    expected = f"[N, {p.clip_samples}] (N clips of {p.clip_samples} samples at {p.sample_rate} Hz)"
    tensor, raw = input_tensor(request, GRPC_INPUT, SERVES, f" (FP32 {expected})")
    if tensor.datatype != "FP32":
        raise ValueError(f"{GRPC_INPUT}: datatype {tensor.datatype!r} not accepted; send samples "
                         "in [-1, 1] as FP32")
    if len(tensor.shape) != 2:  # counted before a dimension is read
        raise ValueError(f"{GRPC_INPUT}: shape {shape_of(tensor)}; expected {expected}")
    shape = list(tensor.shape)
    if shape[1] != p.clip_samples or shape[0] < 0:
        raise ValueError(f"{GRPC_INPUT}: shape {shape}; expected {expected}")
    if shape[0] == 0:
        raise ValueError(f"{GRPC_INPUT}: no clips; expected {expected} with N >= 1")
    if shape[0] > args.serve.max_batch_items:
        raise ValueError(f"{GRPC_INPUT}: {shape[0]} clips; at most {args.serve.max_batch_items} "
                         "clips per request")
    count = shape[0] * shape[1]
    if raw is not None:
        if len(raw) != count * 4:
            raise ValueError(f"{GRPC_INPUT}: shape {shape} of FP32 is {count * 4} bytes; "
                             f"raw_input_contents[0] holds {len(raw)} bytes")
        values = np.frombuffer(raw, "<f4")
    else:
        contents = tensor.contents.fp32_contents
        if len(contents) != count:
            raise ValueError(f"{GRPC_INPUT}: shape {shape} has {count} values; "
                             f"contents.fp32_contents holds {len(contents)}")
        values = np.array(contents, np.float32)
    return waveforms(values.reshape(shape), card, GRPC_INPUT)


def grpc_metadata(card: ModelCard) -> tuple[str, list[str], list[list[int]]]:
    return GRPC_INPUT, ["FP32"], [[-1, card.preprocessing.clip_samples]]
