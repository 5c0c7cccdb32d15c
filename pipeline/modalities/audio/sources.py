"""The audio modality's `sources` part (pipeline/core/modality.py, called by the ingest stage): audio
sources (audio.ingest.source) read into the ingested layout of pipeline/core/dataset.py:
one recording per item, with the id audio/<split>/<class>/<name>.<ext>.

    spoken_digits     built in: "zero" to "nine" synthesised offline by eSpeak NG
                      (pipeline/modalities/audio/espeak.py), each of audio.ingest.voices voices saying every digit
                      audio.ingest.takes times at a speed and pitch drawn from audio.ingest.speed_wpm and
                      audio.ingest.pitch; 16-bit mono WAV at eSpeak's 22,050 Hz
    <folder>          one subfolder per class of .wav/.flac/.ogg/.opus files, optionally
                      pre-split into train/ val/ test/ (pipeline/core/folders.py: hidden and system
                      files skipped, what cannot be taken refused by name)
    Parquet, .tar     a Parquet file or folder (what Hugging Face `datasets` exports: an
                      `audio` column of {bytes, path}), or WebDataset .tar shards
                      (pipeline/core/records.py)

A folder's files are stored byte for byte; the validate stage decodes each
(pipeline/modalities/audio/decode.py) and names those it cannot take. A folder that is not pre-split gets
data.split, stratified and seeded like images.

The built-in set is split by voice, not by clip: a voice (an accent and a variant, a speaker) is
in one split only, so the test split measures digits said by voices the model never heard, and
val is as unseen. The voices are a seeded draw from eSpeak NG's English accents times its voice
variants; the same params give the same files, byte for byte.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from pipeline import StageError
from pipeline.modalities.audio.decode import AUDIO_SUFFIXES
from pipeline.core import records
from pipeline.core.dataset import ShardWriter
from pipeline.core.folders import FileKind, copy_folder, stratified_split
from pipeline.params import Params, Split

AUDIO = FileKind(suffixes=AUDIO_SUFFIXES, one="an audio file", many="audio files",
                 files="audio files", other="non-audio")
SPOKEN_DIGITS = "spoken_digits"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# eSpeak NG's English language voices (less en-shaw: `en` written in the Shavian alphabet).
ACCENTS = ("en", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp",
           "en-us", "en-us-nyc")
# Whispered variants have no voicing at all: another task than the voiced speech of the rest.
UNVOICED = frozenset({"whisper", "whisperf"})
# eSpeak NG's volume (0..200): at its default 100, 14 of the 1,200 default clips had samples at
# int16 full scale (clipped, up to 0.23% of a clip's); at 75, one sample of one clip, and the
# quietest clip's RMS is -39 dBFS (median -22).
VOLUME = 75


def source(params: Params) -> str:
    """audio.ingest.source: where the recordings come from."""
    return params.audio.ingest.source


def ingest(params: Params, out: ShardWriter) -> list[str]:
    """Add the recordings of audio.ingest.source to the shards `out`; return the class names."""
    a = params.audio.ingest
    if (classes := records.ingest_records(params, a.source, out, "audio", AUDIO, "audio",
                                          "audio.ingest.source")) is not None:
        return classes
    return ingest_audio(a.source, out, params.data.split, params.data.seed,
                        params.ingest.max_file_bytes, a.voices, a.takes, a.speed_wpm, a.pitch)


def ingest_audio(source: str, out: ShardWriter, split: Split, seed: int, max_file_bytes: int,
                 voices: int, takes: int, speed_wpm: list[int], pitch: list[int]) -> list[str]:
    """Add the recordings to the shards `out`; return the class names. voices, takes, speed_wpm
    and pitch shape the built-in set only."""
    path = Path(source)
    if source == SPOKEN_DIGITS:
        for item in write_spoken_digits(split, seed, voices, takes, speed_wpm, pitch):
            out.add(*item)
        classes = list(DIGITS)
    elif path.is_dir():
        classes = copy_folder(path, out, "audio", split, seed, max_file_bytes, AUDIO,
                              "audio.ingest.source")
    else:
        raise StageError(f"audio.ingest.source {source}: not a folder (nor {SPOKEN_DIGITS!r})")
    if not out.items:
        raise StageError(f"audio.ingest.source {source}: holds no audio files "
                         f"({', '.join(sorted(AUDIO_SUFFIXES))})")
    return classes


def voice_names(variants: list[str]) -> list[str]:
    """Every English voice the built-in set may draw: accent+variant, in a fixed order."""
    return [f"{accent}+{variant}" for accent in ACCENTS for variant in variants
            if variant not in UNVOICED]


def write_spoken_digits(split: Split, seed: int, voices: int, takes: int,
                        speed_wpm: list[int], pitch: list[int]) -> list[tuple]:
    """The item audio/<split>/<digit>/<voice>-<take>.wav for each drawn voice, digit and take:
    (id, label, split, source, WAV bytes) each. Synthesised by a fresh Python process: eSpeak NG's samples
    depend on every utterance its process made before (measured: the same call twice in one
    process gave 8,789 then 8,790 samples, and neither espeak_Terminate nor a new
    espeak_Initialize resets it; the same calls in two fresh processes, the same bytes), so only
    a fresh process makes the same files from the same params whatever its caller synthesised
    before (a test session, a notebook). A subprocess, not a multiprocessing pool: a spawned
    worker re-runs its caller's main script, which fails for a script without a __main__ guard
    or read from stdin."""
    import pickle
    import subprocess
    import sys
    import tempfile

    import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        exchange = Path(tmp) / "exchange.pickle"  # the arguments in, the outcome out
        exchange.write_bytes(pickle.dumps((split, seed, voices, takes, speed_wpm, pitch)))
        # the child imports this very module, wherever the caller's sys.path found it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(pipeline.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", _FRESH, str(exchange)], env=env,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"eSpeak NG synthesis failed in its process (exit "
                               f"{done.returncode}):\n{done.stderr[-4000:]}")
        outcome = pickle.loads(exchange.read_bytes())
    if isinstance(outcome, StageError):
        raise outcome
    return outcome


# What the fresh process runs: synthesise_digits on the pickled arguments; its result, or the
# StageError that names what params ask for that cannot be, pickled back in their place.
_FRESH = """
import pickle, sys
from pathlib import Path
from pipeline import StageError
from pipeline.modalities.audio.sources import synthesise_digits
exchange = Path(sys.argv[1])
try:
    outcome = synthesise_digits(*pickle.loads(exchange.read_bytes()))
except StageError as e:
    outcome = e
exchange.write_bytes(pickle.dumps(outcome))
"""


def synthesise_digits(split: Split, seed: int, voices: int, takes: int,
                      speed_wpm: list[int], pitch: list[int]) -> list[tuple]:
    """write_spoken_digits' work, in the process it runs in (a fresh one: see there)."""
    import soundfile

    from pipeline.modalities.audio.espeak import synthesiser

    speaker = synthesiser()
    available = voice_names(speaker.variants())
    if voices > len(available):
        raise StageError(f"audio.ingest.voices {voices}: eSpeak NG has {len(available)} English voices")
    rng = np.random.default_rng(seed)
    chosen = [available[i] for i in sorted(rng.choice(len(available), voices, replace=False))]
    # a seeded split of the voices, each a group of its own: the stratified split of one class
    splits = stratified_split(["voice"] * len(chosen), split, seed)
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        raise StageError(f"audio.ingest.voices {voices}: too few voices for data.split: no voice in "
                         f"{', '.join(sorted(missing))}")
    rows = []
    for voice, s in zip(chosen, splits):
        for take in range(takes):
            for digit in DIGITS:
                wpm = int(rng.integers(speed_wpm[0], speed_wpm[1] + 1))
                base = int(rng.integers(pitch[0], pitch[1] + 1))
                samples = speaker.say(digit, voice, wpm, base, VOLUME, seed=len(rows) + seed)
                wav = io.BytesIO()
                soundfile.write(wav, samples, speaker.sample_rate, subtype="PCM_16", format="WAV")
                rows.append((f"audio/{s}/{digit}/{voice.replace(' ', '_')}-{take}.wav", digit, s,
                             f"eSpeak NG {voice} at {wpm} wpm, pitch {base}", wav.getvalue()))
    return rows
