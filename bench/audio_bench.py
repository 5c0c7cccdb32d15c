"""Audio data in: the built-in spoken digits and the decoding the stages and the service share.

    .venv/bin/python bench/audio_bench.py [--runs 3] [--decode-runs 200]

1. Synthesis: `ingest_audio("spoken_digits", ...)` with the real params.yaml (audio.ingest.voices,
   audio.ingest.takes, audio.ingest.speed_wpm, audio.ingest.pitch, data.split, data.seed) into the
   shards of a fresh temporary folder (a ShardWriter with ingest.shard_items and
   ingest.row_group_bytes, as the ingest stage opens it), --runs times in this process; wall time
   of the whole ingest (eSpeak NG start on the first call, synthesis, WAV encoding, shards and
   manifest), median and each run. Reported with the set: clips, voices per split, bytes of WAV
   and of the shard files, clip durations (each clip's bytes decoded from the shards). Then
   eSpeak NG alone: `say` of the 10 digits by the first 20 voices at 175 wpm, pitch 50 (200
   clips), total wall time, one run.
2. Decoding one 1 s clip to audio.preprocess.sample_rate mono (pipeline/modalities/audio/decode.py decode, from the
   bytes, as the service gets an upload): median of --decode-runs, for 16-bit WAV at 16 kHz,
   22.05 kHz (the built-in set's), 44.1 kHz stereo and 96 kHz.
3. Resamplers for one 1 s float32 mono clip to 16 kHz: libsoxr (`soxr.resample`, its "HQ"
   default, what decode uses) and scipy's `resample_poly` (Kaiser window, its defaults), median
   of --decode-runs; and the alias level: the RMS, in dB relative to the input's, of a 9 kHz
   tone after resampling to 16 kHz (above the new 8 kHz Nyquist: ideally removed).
4. Import time of soxr and of scipy.signal, each in a fresh interpreter (`python -X importtime`,
   the module's cumulative microseconds), median of 3.

The machine's load is printed with the result (`os.getloadavg`): on a shared 2-core machine it
moves wall times.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from math import gcd
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.dataset import SPLITS, ShardWriter, item_batches  # noqa: E402
from pipeline.modalities.audio.decode import decode  # noqa: E402
from pipeline.modalities.audio.sources import ingest_audio  # noqa: E402
from pipeline.params import load_params  # noqa: E402


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def synthesis(runs: int) -> None:
    p = load_params(REPO / "params.yaml")
    a = p.audio.ingest
    walls = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            with ShardWriter(Path(tmp), p.ingest.shard_items, p.ingest.row_group_bytes) as out:
                out.close(ingest_audio("spoken_digits", out, p.data.split, p.data.seed,
                                       p.ingest.max_file_bytes, a.voices, a.takes, a.speed_wpm,
                                       a.pitch))
            walls.append(time.perf_counter() - start)
            stored = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
            rows, size, seconds = [], 0, []
            for batch, data in item_batches(Path(tmp), SPLITS, 256):
                rows += batch
                size += sum(len(d) for d in data)
                seconds += [decode(d, p.audio.preprocess.sample_rate, r["id"]).seconds
                            for r, d in zip(batch, data)]
    voices = {s: len({r["source"].split()[2] for r in rows if r["split"] == s})
              for s in ("train", "val", "test")}
    print(f"synthesis: {len(rows)} clips ({a.voices} voices x 10 digits x {a.takes} takes; "
          f"voices per split {voices}), {size / 1e6:.1f} MB of 16-bit 22.05 kHz WAV "
          f"({stored / 1e6:.1f} MB of shard files), clips "
          f"{min(seconds):.2f}-{max(seconds):.2f} s (median {statistics.median(seconds):.2f})")
    print(f"  wall time median {statistics.median(walls):.2f} s of {runs} runs: "
          + ", ".join(f"{w:.2f}" for w in walls))
    from pipeline.modalities.audio.espeak import synthesiser
    from pipeline.modalities.audio.sources import DIGITS, VOLUME, voice_names

    speaker = synthesiser()
    start = time.perf_counter()
    for voice in voice_names(speaker.variants())[:20]:
        for digit in DIGITS:
            speaker.say(digit, voice, 175, 50, VOLUME, seed=0)
    print(f"  eSpeak NG alone: 200 clips in {time.perf_counter() - start:.2f} s")


def import_seconds(module: str) -> float:
    """Cumulative import time of `module` in a fresh interpreter, median of 3."""
    times = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                              capture_output=True, text=True, check=True)
        line = [l for l in done.stderr.splitlines() if l.rstrip().endswith(f"| {module}")][-1]
        times.append(int(line.split("|")[1]) / 1e6)
    return statistics.median(times)


def tone(rate: int, hz: float, channels: int = 1) -> np.ndarray:
    x = (0.5 * np.sin(2 * np.pi * hz * np.arange(rate) / rate)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def decoding(runs: int, sample_rate: int) -> None:
    import soundfile

    for rate, channels in ((16000, 1), (22050, 1), (44100, 2), (96000, 1)):
        buffer = io.BytesIO()
        soundfile.write(buffer, tone(rate, 440.0, channels), rate, format="WAV",
                        subtype="PCM_16")
        data = buffer.getvalue()
        ms = median_ms(lambda: decode(data, sample_rate), runs)
        print(f"decode 1 s 16-bit WAV {rate} Hz x{channels} -> {sample_rate} Hz mono: "
              f"{ms:.3f} ms (median of {runs})")


def resamplers(runs: int, target: int) -> None:
    import soxr
    from scipy.signal import resample_poly

    for rate in (8000, 22050, 44100, 48000, 96000, 44056):
        x = tone(rate, 440.0)
        g = gcd(rate, target)
        poly = median_ms(lambda: resample_poly(x, target // g, rate // g), runs)
        sox = median_ms(lambda: soxr.resample(x, rate, target), runs)
        alias = ""
        if rate > 2 * 9000:
            high = tone(rate, 9000.0)
            level = np.sqrt(np.mean(high ** 2))

            def db(y):
                return 20 * np.log10(np.sqrt(np.mean(y[200:-200] ** 2)) / level)
            alias = (f"; 9 kHz alias soxr {db(soxr.resample(high, rate, target)):.0f} dB, "
                     f"resample_poly {db(resample_poly(high, target // g, rate // g)):.0f} dB")
        print(f"resample 1 s {rate} -> {target} Hz: soxr {sox:.3f} ms, resample_poly "
              f"({target // g}/{rate // g}) {poly:.3f} ms{alias}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/audio_bench.py")
    parser.add_argument("--runs", type=int, default=3, help="synthesis runs")
    parser.add_argument("--decode-runs", type=int, default=200, help="runs per decode timing")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    synthesis(args.runs)
    sample_rate = load_params(REPO / "params.yaml").audio.preprocess.sample_rate
    decoding(args.decode_runs, sample_rate)
    resamplers(args.decode_runs, sample_rate)
    for module in ("soxr", "scipy.signal"):
        print(f"import {module}: {import_seconds(module):.2f} s (median of 3)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
