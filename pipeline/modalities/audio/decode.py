"""The one definition of how an audio file becomes samples: decoded, mixed to mono, resampled to
the model's rate and fitted to its clip length. Ingest's checks, validate, training and the
service all decode through here, so the model is served what it was trained on.

Accepted: WAV (also WAVE_FORMAT_EXTENSIBLE and RF64), FLAC, Ogg (Vorbis or Opus) and MP3, decoded
by the libsndfile inside the soundfile wheel (MP3 through its mpg123), at any sample rate,
channel count and sample format libsndfile decodes (8-bit unsigned or signed PCM, 16/24/32-bit
PCM, float, mu-law, A-law, ADPCM, MPEG layer I-III); and AAC, in an M4A (MP4) file or a raw ADTS
stream (.aac), decoded by FFmpeg's AAC decoder inside PyAV's wheel. Which decoder reads a file is
decided by its first bytes, never by its name. PyAV is only imported for such a file, told the
container (FFmpeg probes no other demuxer), given the bytes or an open file (no FFmpeg protocol
is involved, so nothing else can be opened), and only AAC audio is decoded from it: FFmpeg's
hundreds of other decoders never see an upload. Measured with `strace -f -e trace=connect,socket`
(and tests/test_formats.py, in a loopback-only namespace): importing PyAV 18.1.0 and decoding
M4A and ADTS opens no socket.

Refused, with AudioError naming the file and the cause: an empty file, bytes neither decoder can
decode (corrupt, or not audio), a container other than those, an M4A whose audio is not AAC, a
name whose extension says another container than the bytes hold, a file with no samples,
non-finite float samples, and (with max_seconds) a file longer than that, refused from its
header before any sample is read (an ADTS stream has no length in a header: it is refused once
decoding passes max_seconds).

Decoded, not refused: 8-bit, stereo or more channels, any rate (96 kHz, 8 kHz), silence and
clipping. Those are properties of a recording, not errors in it; Decoded reports them (source
format, rate, channels, duration, clipped share, RMS) for the validate stage, which bounds
duration, clipping and silent shares per data set, and for the service, which answers a silent
or too long upload with a 4xx. An MP3 or M4A cut short decodes up to its cut, as a WAV does:
Decoded carries the length its header declares, and `truncation` says when the samples fall
short of it, for validate. Duplicates and cross-split leakage are validate's as well (a hash of
the decoded samples finds a WAV and its FLAC copy alike).

Resampling is libsoxr's (the `soxr` package, "HQ", its default), not scipy's resample_poly:
measured (docs/benchmarks.md, Audio) 4-42x faster per 1 s clip, a 9 kHz tone aliased into a
16 kHz output at -141 dB against resample_poly's -31 dB, and any rate pair costs about the same
(44,056 to 16,000 Hz: 0.9 ms vs 39 ms); soxr imports in 0.2 s and installs 0.5 MB, scipy.signal
1.9 s and 113 MB (the Bento has no scipy).

Needs only numpy, soundfile (libsndfile is inside its wheel), soxr and, for AAC, av (FFmpeg is
inside its wheel): the service uses it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

# extension -> the containers a file so named may hold: libsndfile's format names, and MP4 and
# AAC (an ADTS stream) for the files FFmpeg decodes
CONTAINERS = {".wav": ("WAV", "WAVEX", "RF64"), ".flac": ("FLAC",), ".ogg": ("OGG",),
              ".opus": ("OGG",), ".mp3": ("MP3",), ".m4a": ("MP4",), ".aac": ("AAC",)}
AUDIO_SUFFIXES = frozenset(CONTAINERS)
ACCEPTED = "WAV, FLAC, Ogg, MP3, M4A or AAC"  # how messages name them
# container -> FFmpeg's demuxer for it, the one PyAV is told to use (nothing is probed)
DEMUXERS = {"MP4": "mp4", "AAC": "aac"}
# Samples (at the file's rate) by which decoding may end short of the length a header declares
# with nothing lost: an MPEG audio frame (1,152; without a Xing/LAME tag libsndfile estimates an
# MP3's length from its size: measured within 240 samples of the decoded length); AAC's priming
# frame and one more (2 x 1,024).
SLACK = {"MP3": 1152, "MP4": 2048}
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
    format: str           # the container: WAV, WAVEX, RF64, FLAC, OGG, MP3 (libsndfile's
                          # names), MP4, AAC
    subtype: str          # the sample format: PCM_16, PCM_U8, FLOAT, VORBIS, MPEG_LAYER_III
                          # (libsndfile's names), AAC ...
    seconds: float        # the file's duration, as decoded
    clipped: float        # share of the file's samples (all channels) at or beyond full scale
    rms: float            # root mean square of `samples`, 0..1 (a silent clip is near 0)
    # s, the length the header declares where a file cut short still decodes (MP3: its Xing or
    # LAME tag, else libsndfile's estimate from the file size; M4A: its sample tables); None
    # for the rest (libsndfile counts a WAV's frames from the bytes present, refuses a cut FLAC
    # or Ogg file; an ADTS stream declares none)
    declared_seconds: float | None


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
        head = bytes(source[:12])
        opened = io.BytesIO(source)
    else:
        where = named = name or str(source)
        try:
            size = Path(source).stat().st_size
            with open(source, "rb") as f:
                head = f.read(12)
        except OSError as e:
            raise AudioError(f"{where}: cannot be read ({e.strerror or e})") from None
        opened = source
    suffix = Path(named).suffix.lower() if named else ""
    if suffix and suffix not in CONTAINERS:
        raise AudioError(f"{where}: extension {suffix!r} is not an accepted audio file "
                         f"(accepted: {', '.join(CONTAINERS)})")
    if size == 0:
        raise AudioError(f"{where}: empty (0 bytes)")
    container = ffmpeg_container(head)
    read = _read_ffmpeg if container else _read_libsndfile
    audio, source_rate, container, subtype, declared_seconds = read(opened, where, suffix,
                                                                   container, max_seconds)
    channels = audio.shape[1]
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
                   rms=float(np.sqrt(np.mean(np.square(mono, dtype=np.float64)))),
                   declared_seconds=declared_seconds)


def ffmpeg_container(head: bytes) -> str | None:
    """The container FFmpeg decodes that a file's first 12 bytes announce (an MP4's `ftyp` box,
    an ADTS frame's sync word with MPEG layer 0, which MP3 never has), or None."""
    if head[4:8] == b"ftyp":
        return "MP4"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "AAC"
    return None


def truncation(decoded: Decoded) -> str | None:
    """Why a decoded MP3 or M4A was cut short (an interrupted copy or download): its samples end
    more than SLACK before the length its header declares; None when whole, or unknown."""
    if decoded.declared_seconds is None:
        return None
    short = (decoded.declared_seconds - decoded.seconds) * decoded.source_rate
    if short <= SLACK[decoded.format]:
        return None
    return (f"its header declares {decoded.declared_seconds:.2f} s, "
            f"{decoded.seconds:.2f} s decode")


# What a reader returns: samples float32 (frames, channels), the file's rate (Hz), container,
# sample format, and the seconds its header declares where a cut file still decodes (else None).
Read = tuple[np.ndarray, int, str, str, float | None]


def _read_libsndfile(opened, where: str, suffix: str, _: None,
                     max_seconds: float | None) -> Read:
    try:
        with soundfile.SoundFile(opened) as f:
            container, subtype = f.format, f.subtype
            source_rate, channels, frames = f.samplerate, f.channels, f.frames
            _check_container(where, suffix, container)
            if source_rate <= 0 or channels <= 0:
                raise AudioError(f"{where}: corrupt header ({source_rate} Hz, {channels} "
                                 "channels)")
            _check_length(where, frames / source_rate, max_seconds)
            audio = f.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise AudioError(f"{where}: cannot be decoded: {e.error_string.rstrip('.')} (corrupt, "
                         f"or not {ACCEPTED} audio)") from None
    except (RuntimeError, soundfile.SoundFileError) as e:  # an error while reading frames
        raise AudioError(f"{where}: cannot be decoded: {e} (corrupt)") from None
    return (audio, source_rate, container, subtype,
            frames / source_rate if container == "MP3" else None)


def _read_ffmpeg(opened, where: str, suffix: str, container: str,
                 max_seconds: float | None) -> Read:
    """An M4A or ADTS file's AAC audio, decoded by FFmpeg through PyAV."""
    import av  # here: only such files load FFmpeg (~0.1 s)

    _check_container(where, suffix, container)
    chunks: list[np.ndarray] = []
    try:
        with (open(opened, "rb") if isinstance(opened, (str, Path)) else opened) as file, \
                av.open(file, format=DEMUXERS[container]) as media:
            if not media.streams.audio:  # also an M4A cut before its sample tables
                raise AudioError(f"{where}: holds no audio stream ({container}: corrupt, or "
                                 "cut short)")
            stream = media.streams.audio[0]
            codec = stream.codec_context.name
            if codec != "aac":
                raise AudioError(f"{where}: its {codec.upper()} audio is not accepted "
                                 f"({container} files: AAC only)")
            declared, rate, decoded = None, 0, 0
            if container == "MP4" and stream.duration:  # ADTS has no length, only an estimate
                declared = float(stream.duration * stream.time_base)
                _check_length(where, declared, max_seconds)
            channels = 0
            for frame in media.decode(stream):
                if not rate:
                    rate, channels = frame.sample_rate, len(frame.layout.channels)
                if (frame.sample_rate, len(frame.layout.channels)) != (rate, channels):
                    raise AudioError(f"{where}: changes from {rate} Hz, {channels} channels "
                                     f"to {frame.sample_rate} Hz, {len(frame.layout.channels)} "
                                     "mid-stream")
                if frame.format.name != "fltp":  # what FFmpeg's AAC decoder gives
                    raise AudioError(f"{where}: AAC decoded to {frame.format.name} samples, "
                                     "not float")
                chunks.append(frame.to_ndarray().T)
                decoded += frame.samples
                # the header's length was checked; this bounds a header that lies, and ADTS
                _check_length(where, decoded / rate, max_seconds)
    except av.FFmpegError as e:
        if chunks:  # a damaged or missing packet after good ones
            whole = f" of the {declared:.2f} s its header declares" if declared else ""
            raise AudioError(f"{where}: cannot be decoded past {decoded / rate:.2f} s{whole}: "
                             f"{e.strerror} (corrupt, or cut short)") from None
        raise AudioError(f"{where}: cannot be decoded: {e.strerror} (corrupt, or not "
                         f"{ACCEPTED} audio)") from None
    audio = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    return audio, rate or 1, container, "AAC", declared


def _check_length(where: str, seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{where}: {seconds:.2f} s long, over the {max_seconds:g} s allowed")


def _check_container(where: str, suffix: str, container: str) -> None:
    """The container is one Kiln takes, and the one the file's extension names (if it has one)."""
    accepted = {c for containers in CONTAINERS.values() for c in containers}
    if container not in accepted:
        raise AudioError(f"{where}: {container} audio is not accepted (accepted: {ACCEPTED})")
    if suffix and container not in CONTAINERS[suffix]:
        raise AudioError(f"{where}: holds {container} audio, but its extension {suffix!r} says "
                         f"{CONTAINERS[suffix][0]}: rename it")
