"""The validate stage's audio part (data.modality audio): the clips table, its Great Expectations
checks, the data profile and drift features. pipeline/stages/validate.py runs them with the checks every
modality shares (manifest, classes, PSI/KS drift) and reports failures the same way (GX report,
Data Docs, one line per failed kind).

    clips    one row per ingested item: path, source, label, split; file_problem (why the file
             cannot be taken: the kind) and decode_error (pipeline/modalities/audio/decode.py's AudioError,
             the cause); then of the recording as recorded: format ("WAV PCM_16"), source_rate
             (Hz), channels, seconds, clipped (share of its samples at full scale); and of its
             samples decoded as every later consumer decodes them (mono at audio.preprocess.sample_rate):
             rms, loudness (dBFS), centroid (spectral centroid, Hz), content_hash (sha256 of the
             samples, so a WAV and its FLAC copy collide); flags derived from those: silent
             (rms under audio.preprocess.silent_rms), clipping (clipped over audio.validate.clipped_samples), alike
             (compared for copies: decoded, not silent); validate adds leak, duplicate and
             repeated over the whole data set (pipeline/core/copies.py)

What decode.py refuses (empty, corrupt or not audio, an extension that names another container,
no samples, non-finite samples), and a WAV, MP3 or M4A cut short (which it decodes up to the
cut), stop the stage naming the file. What it decodes is taken and reported, not refused: 8-bit samples,
several channels (mixed to mono), any rate (resampled); the metrics count the clips per format,
source rate and channel count, and the stage prints them. Silent and clipped clips are bounded
per data set (audio.validate.max_silent_share, audio.validate.max_clipped_share); clipped ones within the bound
are named on a line of their own.

Drift features of the train split (pipeline/core/drift.py scores them):
    label, source_rate, channels   class balance, how it was recorded   PSI
    seconds                        duration as recorded, s              PSI and KS
    loudness                       RMS level, dBFS                      PSI and KS
    centroid                       spectral centroid, Hz (brightness)   PSI and KS
Silent clips have no loudness nor centroid (RMS 0: no spectrum); the silent check counts them.

Clips are decoded through the executor (pipeline/core/executor.py, in parallel), a shard at a
time, as images are.
"""
from __future__ import annotations

import functools
import hashlib
import struct
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.modalities.audio.decode import ACCEPTED, AudioError, decode, truncation
from pipeline.core.checks import Checks, Data, file_problems, showing
from pipeline.core.copies import KEY
from pipeline.core.drift import PROFILE_QUANTILES, PROFILE_VERSION, DriftReport, compare, counted
from pipeline.core.dataset import described_table
from pipeline.params import Params

# What --metrics holds (the rest of Validation.metrics goes to --details): the counts a person
# compares across runs.
SUMMARY = ("clips", "classes", "splits", "undecodable", "silent", "clipped", "duplicates",
           "checks_passed", "checks_failed", "success")
# Every key of validate's metrics for clips, in the order the details JSON holds them.
METRICS = ("clips", "classes", "splits", "undecodable", "silent", "clipped", "duplicates",
           "recorded", "seconds", "clipped_clips", "sample_rate", "checks_passed",
           "checks_failed", "problems", "file_problems", "drift", "success")
# What file_problem names, and the words of decode.py's AudioError, after the file's name, that
# say it (the first found wins; anything else it refuses, "cannot be decoded" or a corrupt
# header, is "corrupt or not audio"). tests/test_audio_checks.py holds each refusal to its kind.
FILE_PROBLEMS = {
    "empty file": "empty (0 bytes)",
    "wrong extension": "extension '",
    "unaccepted format": "audio is not accepted",
    "no samples": "holds no samples",
    "non-finite samples": "holds non-finite samples",
    "corrupt or not audio": "",
}
# container -> its file_problem when cut short: decode.py reads what is there, this names it
TRUNCATED = {"WAV": "truncated WAV", "WAVEX": "truncated WAV", "MP3": "truncated MP3",
             "MP4": "truncated M4A"}
# A data chunk this long or longer is a streaming writer's placeholder for "unknown" (ffmpeg
# writes 0xFFFFFFFF to a pipe, sox 0x7FFFF000), not a promise the file breaks: 2 GiB of samples.
STREAMED = 0x7FFF0000
COLUMNS = ["path", "source", "label", "split", "file_problem", "decode_error", "format",
           "source_rate", "channels", "seconds", "clipped", "rms", "loudness", "centroid",
           "content_hash"]
# The columns validate keeps of every clip for the data-set checks, metrics and profile; FLAGS:
# the rows the data-set checks and metrics name (their path and source are kept too)
MERGED = ("file_problem", "format", "source_rate", "channels", "seconds", "clipped", "rms",
          "loudness", "centroid")
FLAGS = ("silent", "clipping")
CATEGORICAL = ("label", "source_rate", "channels")  # drift features scored by PSI
CONTINUOUS = ("seconds", "loudness", "centroid")    # and by PSI and KS
SHOWN = 3  # clipped clips named on the stage's line when within audio.validate.max_clipped_share

SAME = "compared by their decoded samples"  # as content_hash is
CHECKS = Checks()  # the clips table's own checks (pipeline/core/checks.py has the shared ones)


def file_problem(cause: str) -> str:
    """The kind (a FILE_PROBLEMS key) of decode.py's refusal `cause` (its message after the
    file's name)."""
    return next(kind for kind, words in FILE_PROBLEMS.items() if words in cause)


def spectral_centroid(samples: np.ndarray, sample_rate: int) -> float:
    """The magnitude-weighted mean frequency of `samples`, Hz; NaN for silence. The spectrum is
    taken zero-padded to a power of two: the built-in set's 1,200 clips in 0.2 s instead of
    1.1 s at their own lengths (pocketfft is slow on large prime factors), centroids within 2%
    (median 0.06%) of those, the same for every clip of a data set and its champion's."""
    n = 1 << (len(samples) - 1).bit_length()
    magnitude = np.abs(np.fft.rfft(samples, n))
    total = magnitude.sum()
    if total == 0:
        return float("nan")
    return float(magnitude @ np.fft.rfftfreq(n, 1 / sample_rate) / total)


def wav_truncation(data: bytes) -> str | None:
    """Why a RIFF WAV file is cut short: its data chunk's header promises more bytes than follow
    it (an interrupted copy or download); None when whole, or not a RIFF WAV. libsndfile decodes
    such a file up to its end without an error, so decode.py takes it."""
    riff, _, wave = struct.unpack("<4sI4s", data[:12].ljust(12, b"\0"))
    if (riff, wave) != (b"RIFF", b"WAVE"):
        return None
    size, offset = len(data), 12
    while offset + 8 <= size:  # chunk by chunk: id, length, bytes (padded to even)
        chunk, length = struct.unpack("<4sI", data[offset:offset + 8])
        if chunk == b"data":
            held = size - offset - 8
            if held < length < STREAMED:
                return f"its header promises {length} bytes of samples, {held} follow"
            return None
        offset += 8 + length + (length & 1)
    return None


def describe_clip(item: tuple[str, bytes], sample_rate: int) -> dict:
    """How one file ((id, bytes): its id's extension must agree with its bytes) was recorded, and its samples decoded to mono at `sample_rate` described;
    or, when decode.py refuses it or it is a WAV, MP3 or M4A cut short, file_problem (the kind) and
    decode_error (the cause)."""
    name, data = item
    try:
        decoded = decode(data, sample_rate, name)
    except AudioError as e:
        cause = str(e).removeprefix(f"{name}: ")
        return {"file_problem": file_problem(cause), "decode_error": cause}
    cut = wav_truncation(data) if decoded.format in ("WAV", "WAVEX") else truncation(decoded)
    if cut:
        return {"file_problem": TRUNCATED[decoded.format], "decode_error": cut}
    samples = decoded.samples
    return {
        "file_problem": None, "decode_error": None,
        "format": f"{decoded.format} {decoded.subtype}", "source_rate": decoded.source_rate,
        "channels": decoded.channels, "seconds": decoded.seconds, "clipped": decoded.clipped,
        "rms": decoded.rms,
        "loudness": 20 * np.log10(decoded.rms) if decoded.rms > 0 else float("nan"),
        "centroid": spectral_centroid(samples, sample_rate),
        "content_hash": hashlib.sha256(samples.tobytes()).hexdigest(),
    }


def shard_table(shard: Path, params: Params) -> tuple[pd.DataFrame, None]:
    """One row per item of a shard file, described and flagged; clips need nothing else for
    their profile. Silent clips are not compared for copies (silence of one length is the same
    samples by nature): each problem is reported once, by its own check."""
    audio = params.audio
    clips = described_table(shard, functools.partial(
        describe_clip, sample_rate=audio.preprocess.sample_rate), COLUMNS, named=True).astype(
        {c: float for c in ("source_rate", "channels", "seconds", "clipped", "rms", "loudness",
                            "centroid")})
    decoded = clips.file_problem.isna()
    silent = decoded & (clips.rms < audio.preprocess.silent_rms)
    return clips.assign(
        silent=silent,
        clipping=decoded & (clips.clipped > audio.validate.clipped_samples),
        alike=decoded & ~silent,
    ), None


def conclude(table: pd.DataFrame, extras: list, params: Params, reference: dict | None
             ) -> tuple[dict, DriftReport | None]:
    """The profile of the data set's train split and that split's drift from `reference`."""
    current = profile(table[table.split == "train"])
    report = compare(reference, current, params.drift, CATEGORICAL, CONTINUOUS) \
        if reference is not None else None
    return current, report


def _clipped(source: str, share: float) -> str:
    return f"{source} ({share:.2%} of samples at full scale)"


@CHECKS.check("unreadable_clips", "unusable audio file", name=file_problems)
def decodes(E, d: Data):
    return E.ExpectColumnValuesToBeNull(
        column="file_problem",
        description=f"Every file is {ACCEPTED} audio that decodes: not empty, not corrupt nor "
                    "cut short, in the container its extension names, with finite samples.")


@CHECKS.check("clip_duration", "recording length out of bounds", name=showing("{seconds:.2f} s"))
def duration(E, d: Data):
    rules = d.params.audio.validate
    return E.ExpectColumnValuesToBeBetween(
        column="seconds", min_value=rules.min_seconds, max_value=rules.max_seconds,
        description=f"Every recording lasts {rules.min_seconds:g} to {rules.max_seconds:g} s "
                    "(params audio.validate.min_seconds, audio.validate.max_seconds).")


def _silent(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    by_path = table.set_index("path")
    return [f"{res['unexpected_percent']:.1f}% silent"] + [
        f"{by_path.source[r['path']]} (RMS {by_path.rms[r['path']]:.2g})"
        for r in res["unexpected_index_list"]]


# mostly: GX passes while at least this share of rows is not silent (not clipped)
@CHECKS.check("silent_clips", "too many silent clips", table="data_set", name=_silent)
def not_silent(E, d: Data):
    share, rms = d.params.audio.validate.max_silent_share, d.params.audio.preprocess.silent_rms
    return E.ExpectColumnValuesToBeInSet(
        column="silent", value_set=[False], mostly=1 - share,
        description=f"At most {share:.1%} of the clips are silent (RMS under {rms:g} of full "
                    "scale) (params audio.validate.max_silent_share, audio.preprocess.silent_rms).")


def _clipped_named(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    by_path = table.set_index("path")
    return [f"{res['unexpected_percent']:.1f}% clipped"] + [
        _clipped(by_path.source[r["path"]], by_path.clipped[r["path"]])
        for r in res["unexpected_index_list"]]


@CHECKS.check("clipped_clips", "too many clipped clips", table="data_set",
              name=_clipped_named)
def not_clipped(E, d: Data):
    rules = d.params.audio.validate
    return E.ExpectColumnValuesToBeInSet(
        column="clipping", value_set=[False], mostly=1 - rules.max_clipped_share,
        description=f"At most {rules.max_clipped_share:.1%} of the clips are clipped (over "
                    f"{rules.clipped_samples:.2%} of their samples at full scale) (params "
                    "audio.validate.max_clipped_share, audio.validate.clipped_samples).")


def metrics(table: pd.DataFrame, params: Params) -> dict:
    """What validate's metrics hold for clips besides the shared counts: how the decodable clips
    were recorded (format, source rate, channels), their durations, the clipped ones by name."""
    decoded = table[table.file_problem.isna()]
    clipped = decoded[decoded.clipping].sort_values("clipped", ascending=False)
    return {
        "clips": len(table),
        "undecodable": int(table.file_problem.notna().sum()),
        "silent": int(decoded.silent.sum()),
        "clipped": len(clipped),
        "duplicates": int(decoded[~decoded.silent].duplicated(KEY).sum()),
        "recorded": {"format": counted(decoded.format),
                     "source_rate": counted(decoded.source_rate.astype(int)),
                     "channels": counted(decoded.channels.astype(int))},
        "seconds": {q: round(float(decoded.seconds.quantile(v)), 4) if len(decoded) else None
                    for q, v in (("min", 0), ("median", 0.5), ("max", 1))},
        "clipped_clips": [_clipped(s, c) for s, c in
                          zip(clipped.source[:SHOWN], clipped.clipped[:SHOWN])],
        "sample_rate": params.audio.preprocess.sample_rate,
        "file_problems": {p.lower().replace(" ", "_").replace("-", "_"):
                          int((table.file_problem == p).sum())
                          for p in (*FILE_PROBLEMS, *sorted(set(TRUNCATED.values())))},
    }


def lines(metrics: dict, params: Params) -> list[str]:
    """What validate prints besides its summary: how the clips were recorded and what decoding
    made of them; the clipped clips, if any, by name."""
    recorded = metrics["recorded"]
    if not recorded["format"]:
        return []
    rates = ", ".join(f"{rate} Hz {n}" for rate, n in recorded["source_rate"].items())
    channels = ", ".join(f"{c} channel{'s' if c != '1' else ''} {n}"
                         for c, n in recorded["channels"].items())
    found = [f"recorded as {', '.join(f'{f} {n}' for f, n in recorded['format'].items())}; "
             f"{rates}; {channels}; decoded to mono at {metrics['sample_rate']} Hz; "
             f"{metrics['seconds']['min']:.2f} to {metrics['seconds']['max']:.2f} s long"]
    audio, n = params.audio, metrics["clipped"]
    if n:
        found.append(f"{n} clipped clip{'s' if n > 1 else ''} (over {audio.validate.clipped_samples:.2%} "
                     f"of samples at full scale; audio.validate.max_clipped_share "
                     f"{audio.validate.max_clipped_share:.0%} allowed): "
                     + "; ".join(metrics["clipped_clips"])
                     + (f" (+{n - SHOWN} more)" if n > SHOWN else ""))
    if metrics["silent"]:
        found.append(f"{metrics['silent']} silent clip{'s' if metrics['silent'] > 1 else ''} "
                     f"(RMS under audio.preprocess.silent_rms {audio.preprocess.silent_rms:g}; "
                     f"audio.validate.max_silent_share {audio.validate.max_silent_share:.0%} allowed)")
    return found


# ---- drift ---------------------------------------------------------------------------------

def profile(clips: pd.DataFrame) -> dict:
    """Reference statistics (pipeline/core/drift.py's layout) of the decodable rows of a clips table;
    loudness and centroid of the clips that have them (not silent)."""
    decoded = clips[clips.file_problem.isna()]
    columns = {"label": decoded.label, "source_rate": decoded.source_rate.astype(int),
               "channels": decoded.channels.astype(int)}
    levels = np.linspace(0, 1, PROFILE_QUANTILES)
    quantiles = {}
    for name in CONTINUOUS:
        values = decoded[name].dropna().to_numpy(float)
        quantiles[name] = np.quantile(values, levels, method="inverted_cdf").round(4).tolist() \
            if len(values) else []
    return {
        "version": PROFILE_VERSION,
        "modality": "audio",
        "clips": len(decoded),
        "categorical": {name: counted(column) for name, column in columns.items()},
        "quantiles": quantiles,
    }
