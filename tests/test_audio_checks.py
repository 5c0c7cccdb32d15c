"""Audio data through the validate stage (data.modality audio, pipeline/modalities/audio/checks.py): the
bad-audio matrix of issue 13, one test per kind, each stopping validate with the file named or
passing with what it found reported; the built-in spoken digits and a user's folder through
ingest and validate; drift against a champion's audio profile. Stages run as users run them,
`python -m pipeline.stages <stage>` in a project folder with the repo's params.yaml shrunk
(tests/conftest.py), in-process through pipeline.stages.__main__.main() (tests/test_bad_data.py's
`stage` fixture: same code path, no champion).

Recordings are generated here: tones, each file its own pitch, so none is a copy of another."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

import pipeline.stages.validate
from pipeline.modalities.audio import checks
from pipeline.modalities.audio.decode import decode
from pipeline.lifecycle.champion import Reference
from pipeline.core.dataset import SPLITS, ShardWriter
from pipeline.params import ParamsError, load_params
from tests.stage_runs import VALIDATE, details, ingest_and_validate, problems
from tests.ingested import train_profile

REPO = Path(__file__).resolve().parents[1]
RATE = 16000  # Hz the generated clips are written at (params.yaml audio.preprocess.sample_rate)
CLASSES = {"high": 880.0, "low": 220.0}  # Hz of each class's tones
# A low-discrepancy (Kronecker) sequence: pitch, duration and level of the n-th clip are the
# fractional parts of n times these, so two stretches of it share one distribution closely.
STEPS = np.array([(5 ** 0.5 - 1) / 2, 2 ** 0.5 - 1, 3 ** 0.5 - 1])


def tone(hz: float, seconds: float, amplitude: float = 0.5, rate: int = RATE) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(rate * seconds)) / rate)
            ).astype(np.float32)


def write(path: Path, samples: np.ndarray, rate: int = RATE, container: str = "WAV",
          subtype: str = "PCM_16") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=container, subtype=subtype)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def write_folder(root: Path, per_class: int = 4, start: int = 0, seconds=(0.3, 0.7),
                 amplitude=(0.2, 0.6), brighter: float = 1.0) -> Path:
    """train/ val/ test/ <class>/<n>.wav: per_class tones per class and split, each of its own
    pitch (around the class's), duration and level, from STEPS' sequence at `start`;
    `brighter` multiplies the pitches."""
    n = start
    for split in SPLITS:
        for label, hz in CLASSES.items():
            for i in range(per_class):
                pitch, length, level = (n * STEPS) % 1
                n += 1
                samples = tone(brighter * hz * (0.8 + 0.4 * pitch),
                               seconds[0] + (seconds[1] - seconds[0]) * length,
                               amplitude[0] + (amplitude[1] - amplitude[0]) * level)
                # faded in and out, as a word is: an abrupt start spreads a tone's spectrum,
                # and its centroid then hangs on the exact duration, not on the pitch
                write(root / split / label / f"{i}.wav", samples * np.hanning(len(samples)))
    return root




# --- the bad-audio matrix: what stops validate, naming the file --------------------------------

def spoil_corrupt(source: Path) -> str:
    """A WAV whose header is damaged (fmt chunk zeroed): nothing can be decoded from it, so no
    model can learn from or be tested on it. Stops, naming the file and libsndfile's cause."""
    data = write(source / "train/low/broken.wav", tone(300, 0.5))
    (source / "train/low/broken.wav").write_bytes(data[:12] + bytes(32) + data[44:])
    return ("unusable audio file: Every file is WAV, FLAC, Ogg, MP3, M4A or AAC audio that "
            "decodes: not empty, not corrupt nor cut short, in the container its extension "
            "names, with finite samples. -- 1 break it: corrupt or not audio: "
            "train/low/broken.wav (cannot be decoded: Error in WAV file. No 'data' chunk marker "
            "(corrupt, or not WAV, FLAC, Ogg, MP3, M4A or AAC audio))")


def spoil_truncated(source: Path) -> str:
    """A WAV cut off half way (an interrupted copy): libsndfile decodes the half that is there
    without a word, so decode.py takes it; its header still promises the whole. A clip that
    may have lost its word stops validate, naming the file and both lengths."""
    data = write(source / "val/low/cut.wav", tone(320, 0.5))
    (source / "val/low/cut.wav").write_bytes(data[:len(data) // 2])
    return ("-- 1 break it: truncated WAV: val/low/cut.wav (its header promises 16000 bytes of "
            "samples, 7978 follow)")


def spoil_zero_length(source: Path) -> str:
    """A 0-byte file (an interrupted copy or export): no recording. Stops, naming it."""
    (source / "val/high/empty.wav").write_bytes(b"")
    return "-- 1 break it: empty file: val/high/empty.wav (empty (0 bytes))"


def spoil_wrong_extension(source: Path) -> str:
    """FLAC bytes named .wav. libsndfile could read them, but the service and other tools go by
    the extension, and a name that lies about its content is a bug in the export that made it:
    stops, saying to rename it. (A file whose extension is not an audio one at all, .wma or
    .txt, is skipped by ingest and listed: pipeline/core/folders.py.)"""
    write(source / "test/low/export.wav", tone(310, 0.5), container="FLAC")
    return ("-- 1 break it: wrong extension: test/low/export.wav (holds FLAC audio, but its "
            "extension '.wav' says WAV: rename it)")


def spoil_silent(source: Path) -> str:
    """A recording of a muted microphone (noise at -80 dBFS): its label is learnt from nothing,
    and the service refuses silence (400), so such a clip could never be asked about. None is
    allowed by default (audio.validate.max_silent_share 0): stops, naming it and its RMS."""
    noise = np.random.default_rng(0).normal(0, 1e-4, RATE // 2).astype(np.float32)
    write(source / "train/high/muted.wav", noise)
    return ("too many silent clips: At most 0.0% of the clips are silent (RMS under 0.001 of full "
            "scale) (params audio.validate.max_silent_share, audio.preprocess.silent_rms). -- 1 break it: 4.0% "
            "silent; train/high/muted.wav (RMS 0.0001)")


def spoil_leaked(source: Path) -> str:
    """A training recording re-encoded as FLAC into the test split: the same samples once
    decoded, so the hash of the decoded samples finds it; it would inflate test accuracy.
    Stops, naming both copies."""
    samples, rate = soundfile.read(source / "train/high/2.wav", dtype="float32")
    write(source / "test/high/again.flac", samples, rate, container="FLAC")
    return ("same clip in two splits (leakage): No clip appears in more than one split "
            "(compared by their decoded samples): a copy of a training clip in val or test "
            "inflates the measured accuracy. -- 2 break it: train/high/2.wav (train) = "
            "test/high/again.flac (test)")


@pytest.mark.parametrize("spoil", [spoil_corrupt, spoil_truncated, spoil_zero_length,
                                   spoil_wrong_extension,
                                   spoil_silent, spoil_leaked], ids=lambda f: f.__name__[6:])
def test_bad_audio_stops_validate_naming_the_file(tmp_path, audio_project, stage, spoil):
    expected = spoil(write_folder(tmp_path / "src"))
    work = audio_project(tmp_path / "src")
    code, out = ingest_and_validate(stage, work)
    assert code == 1, out
    assert "kiln validate: error:" in out and "1 data checks failed" in out
    assert expected in out
    assert sum(problems(work).values()) in (1, 2)  # the one kind; a leak counts both copies


# --- the bad-audio matrix: what decodes, passes and is reported --------------------------------

def vary_8_bit(source: Path) -> tuple[str, str]:
    """8-bit unsigned PCM (old recorders, telephony exports): 48 dB of dynamic range, enough
    for speech; libsndfile decodes it like any PCM. Passes, counted by format."""
    write(source / "train/low/old.wav", tone(330, 0.5), subtype="PCM_U8")
    return "recorded as WAV PCM_16 24, WAV PCM_U8 1;", "format"


def vary_stereo(source: Path) -> tuple[str, str]:
    """Two channels (a stereo recorder): mixed to mono by their mean, as the service mixes an
    upload. Passes, counted by channels."""
    write(source / "val/low/stereo.wav", np.stack([tone(340, 0.5), tone(340, 0.5, 0.3)], 1))
    return "1 channel 24, 2 channels 1;", "channels"


def vary_96_khz(source: Path) -> tuple[str, str]:
    """96 kHz (studio equipment): resampled to audio.preprocess.sample_rate by soxr, as every clip is.
    Passes, counted by source rate."""
    write(source / "test/high/studio.wav", tone(900, 0.5, rate=96000), rate=96000)
    return "; 16000 Hz 24, 96000 Hz 1;", "source_rate"


def vary_clipped(source: Path) -> tuple[str, str]:
    """A speaker too close to the microphone: a clipped recording is distorted but still says
    its word, and a few are normal in recorded sets; more than audio.validate.max_clipped_share (5%)
    points at the recording chain. One clip of 25 passes, named on its own line with its
    clipped share; the test then sets the share to 0 and validate stops, naming it."""
    write(source / "train/low/loud.wav", tone(350, 0.5, amplitude=1.2))
    return ("1 clipped clip (over 0.10% of samples at full scale; audio.validate.max_clipped_share 5% "
            "allowed): train/low/loud.wav (36.88% of samples at full scale)"), "clipped"


@pytest.mark.parametrize("vary", [vary_8_bit, vary_stereo, vary_96_khz, vary_clipped],
                         ids=lambda f: f.__name__[5:])
def test_recordings_that_decode_pass_and_are_reported(tmp_path, audio_project, stage, vary):
    expected, what = vary(write_folder(tmp_path / "src"))
    work = audio_project(tmp_path / "src")
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    assert "validate: 25 clips, 2 classes" in out and ", 0 failed;" in out
    assert "validate: recorded as " in out and "decoded to mono at 16000 Hz" in out
    assert expected in out
    found = details(work)
    assert found["success"] and found["undecodable"] == 0
    if what == "clipped":
        assert found["clipped"] == 1 and found["clipped_clips"] == [expected.split(": ", 1)[1]]
        params = work / "params.yaml"
        params.write_text(params.read_text().replace("max_clipped_share: 0.05",
                                                     "max_clipped_share: 0.0"))
        code, out = stage(work, *VALIDATE)
        assert code == 1 and "too many clipped clips: At most 0.0% of the clips are clipped " \
            "(over 0.10% of their samples at full scale) (params audio.validate.max_clipped_share, " \
            "audio.validate.clipped_samples). -- 1 break it: 4.0% clipped; train/low/loud.wav (36.88% " \
            "of samples at full scale)" in out
    else:
        assert sum(found["recorded"][what].values()) == 25 and len(found["recorded"][what]) == 2


def test_a_recording_too_short_or_too_long_is_named(tmp_path, audio_project, stage):
    """Durations as recorded, before fitting to clip_seconds: a click, and a 3 s take whose word
    the centred 1 s window may miss."""
    source = write_folder(tmp_path / "src")
    write(source / "train/high/click.wav", tone(900, 0.02))
    write(source / "val/low/take.wav", tone(300, 3.0))
    code, out = ingest_and_validate(stage, audio_project(source))
    assert code == 1
    assert ("recording length out of bounds: Every recording lasts 0.1 to 1.5 s (params "
            "audio.validate.min_seconds, audio.validate.max_seconds). -- 2 break it: train/high/click.wav "
            "(0.02 s); val/low/take.wav (3.00 s)") in out


# --- sources that work -------------------------------------------------------------------------

def test_the_built_in_spoken_digits_through_ingest_and_validate(tmp_path, audio_project, stage):
    """audio.ingest.source spoken_digits, shrunk to 6 voices saying each digit once: ingest reports the
    split, validate passes and reports eSpeak NG's 22,050 Hz 16-bit mono; the profile holds the
    drift features."""
    work = audio_project("spoken_digits", {"ingest": {"voices": 6, "takes": 1}})
    code, out = stage(work, "ingest", "--out", "data/ingested")
    assert code == 0, out
    assert "ingest: 60 clips from spoken_digits: {'train': 40, 'val': 10, 'test': 10}" in out
    code, out = stage(work, *VALIDATE)
    assert code == 0, out
    assert "validate: 60 clips, 10 classes, {'train': 40, 'val': 10, 'test': 10}: " in out
    assert re.search(r"validate: recorded as WAV PCM_16 60; 22050 Hz 60; 1 channel 60; decoded "
                     r"to mono at 16000 Hz; 0\.\d\d to 0\.\d\d s long", out)
    profile = json.loads((work / "reports/data_profile.json").read_text())
    assert profile["modality"] == "audio" and profile["clips"] == 40
    assert profile["categorical"]["source_rate"] == {"22050": 40}
    assert {k: len(v) for k, v in profile["quantiles"].items()} == \
        {"seconds": 1001, "loudness": 1001, "centroid": 1001}
    metrics = json.loads((work / "reports/validation.json").read_text())
    assert set(metrics) == set(checks.SUMMARY) and metrics["success"]


def test_each_refusal_of_decode_has_its_kind(tmp_path):
    """file_problem's kinds match decode.py's messages (tests/test_audio_data.py REFUSED). A
    file that cannot be read stops ingest, before validate sees bytes (tests/test_audio_data.py
    test_an_unreadable_recording_stops_ingest_naming_it)."""
    from tests.test_audio_data import REFUSED
    kinds = {"corrupt": "corrupt or not audio", "not audio": "corrupt or not audio",
             "zero-length": "empty file", "no samples": "no samples",
             "wrong extension": "wrong extension", "unaccepted extension": "wrong extension",
             "non-finite": "non-finite samples"}
    for kind, name, data, _ in REFUSED:
        if name is None:
            continue
        described = checks.describe_clip((name, data), RATE)
        assert described["file_problem"] == kinds[kind], (kind, described)
        assert not described["decode_error"].startswith(name)
    aiff = write(tmp_path / "aiff.wav", tone(300, 0.2), container="AIFF")
    assert checks.describe_clip(("aiff.wav", aiff), RATE)["file_problem"] == "unaccepted format"


# --- drift against the champion's profile -------------------------------------------------------

@pytest.fixture(scope="module")
def champion_profile(tmp_path_factory) -> dict:
    """The data profile validate writes (and package stores with the champion) for a folder of
    20 tones per class and split, made by the functions validate calls."""
    root = tmp_path_factory.mktemp("champion")
    write_folder(root / "src", per_class=20)
    params = load_params(REPO / "params.yaml")
    from pipeline.modalities.audio.sources import ingest_audio
    a = params.audio.ingest
    with ShardWriter(root / "ingested", 1 << 30, 1 << 26) as out:
        out.close(ingest_audio(str(root / "src"), out, params.data.split, params.data.seed,
                               params.ingest.max_file_bytes, a.voices, a.takes, a.speed_wpm,
                               a.pitch))
    return train_profile(root / "ingested", checks, params)


def test_the_same_kind_of_audio_shows_no_drift(tmp_path, audio_project, stage, monkeypatch,
                                               champion_profile):
    monkeypatch.setattr(pipeline.stages.validate, "reference",
                        lambda *_: Reference("champ:1", champion_profile, ""))
    work = audio_project(write_folder(tmp_path / "src", per_class=20, start=1000))
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    drift = details(work)["drift"]
    assert drift["status"] == "ok" and drift["champion"] == "champ:1", drift
    assert set(drift["features"]) == {"label", "source_rate", "channels", "seconds",
                                      "loudness", "centroid"}
    assert "validate: drift against champ:1: ok; label PSI 0.000" in out


def test_louder_longer_brighter_audio_fails_on_drift(tmp_path, audio_project, stage, monkeypatch,
                                                     champion_profile):
    """Each changed statistic names itself: duration, loudness (dBFS) and spectral centroid."""
    monkeypatch.setattr(pipeline.stages.validate, "reference",
                        lambda *_: Reference("champ:1", champion_profile, ""))
    work = audio_project(write_folder(tmp_path / "src", per_class=20, start=1000,
                                      seconds=(0.8, 1.2), amplitude=(0.7, 0.9), brighter=2.0))
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "drift from the champion's data" in out
    # the low class, twice as high, stays under the high class: half the clips move past it
    assert "seconds KS 1.000; loudness KS 1.000; centroid KS 0.500" in out
    assert details(work)["drift"]["status"] == "fail"


def test_a_text_profile_is_no_reference_for_audio(tmp_path, audio_project, stage, monkeypatch):
    monkeypatch.setattr(pipeline.stages.validate, "reference", lambda *_: Reference(
        "langs:1", {"version": 1, "modality": "text", "categorical": {"label": {}},
                    "quantiles": {}}, ""))
    code, out = ingest_and_validate(stage, audio_project(write_folder(tmp_path / "src")))
    assert code == 1 and "was trained on text data, this data set is audio: give it another " \
        "package.model_name" in out


def test_streamed_and_padded_wavs_are_not_truncated(tmp_path):
    """A streaming writer's placeholder length (ffmpeg to a pipe: 0xFFFFFFFF) and chunks after
    the samples are no truncation; half a file is."""
    data = write(tmp_path / "whole.wav", tone(300, 0.5))
    at = data.index(b"data") + 4
    (tmp_path / "streamed.wav").write_bytes(data[:at] + b"\xff" * 4 + data[at + 4:])
    (tmp_path / "tagged.wav").write_bytes(data + b"LIST\x04\x00\x00\x00INFO")
    (tmp_path / "cut.wav").write_bytes(data[:-100])
    assert [checks.wav_truncation((tmp_path / n).read_bytes()) for n in
            ("whole.wav", "streamed.wav", "tagged.wav")] == [None, None, None]
    assert checks.wav_truncation((tmp_path / "cut.wav").read_bytes()) == \
        "its header promises 16000 bytes of samples, 15900 follow"
    assert checks.describe_clip(("streamed.wav", (tmp_path / "streamed.wav").read_bytes()),
                                RATE)["seconds"] == 0.5


def test_decoded_samples_hash_alike_across_containers(tmp_path):
    """The content hash is of the decoded samples: a WAV and its FLAC copy collide, a one-sample
    change does not."""
    samples = (tone(440, 0.4) * 32767).astype(np.int16)  # 16-bit PCM, as both files hold it
    write(tmp_path / "a.wav", samples)
    write(tmp_path / "a.flac", samples, container="FLAC")
    changed = samples.copy()
    changed[100] += 1
    write(tmp_path / "b.wav", changed)
    hashes = [checks.describe_clip((n, (tmp_path / n).read_bytes()), RATE)["content_hash"]
              for n in ("a.wav", "a.flac", "b.wav")]
    assert hashes[0] == hashes[1] != hashes[2]
    assert decode(tmp_path / "a.wav", RATE).samples.tobytes() == \
        decode(tmp_path / "a.flac", RATE).samples.tobytes()


@pytest.mark.parametrize("changes,message", [
    ({"min_seconds": 2.0}, "audio.validate.min_seconds: must satisfy 0 <= min_seconds <= max_seconds"),
    ({"clipped_samples": 1.0}, "audio.validate.clipped_samples: must be in [0, 1)"),
    ({"max_silent_share": 1.5}, "audio.validate.max_silent_share: must be in [0, 1]"),
    ({"max_clipped_share": -0.1}, "audio.validate.max_clipped_share: must be in [0, 1]"),
    ({"max_seconds": "long"}, "audio.validate.max_seconds: expected float, got str 'long'"),
])
def test_validate_params_out_of_range_are_refused(changes, message, params_writer, tmp_path):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(params_writer(tmp_path, {"audio": {"validate": changes}}))
