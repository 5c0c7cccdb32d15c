"""The formats users have (issue 22): image folders of WebP, BMP, TIFF and GIF beside PNG and
JPEG; MP3, M4A and AAC recordings; CSV and TSV files whose columns have other names. Each goes
through ingest and validate as a user runs them (`python -m pipeline.stages <stage>` in a project folder
with the repo's params.yaml shrunk, in-process: tests/test_bad_data.py's `stage` fixture), and
what Kiln does not take is named with the reason, never skipped. The service's parsers of an
upload (pipeline/modalities/<modality>/serving.py) are checked on the same files without a server: they
decode as validate and training do. Every file is generated here (PIL, soundfile's libsndfile,
PyAV's FFmpeg), none looks like the built-in sets."""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
from PIL import Image

from pipeline.modalities.audio import serving as audio_serving
from pipeline.modalities.audio.decode import AudioError, clip_length, decode, truncation
from pipeline.modalities.audio.preprocess import AudioPreprocessing
from pipeline.modalities.image import serving as image_serving
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.core.card import BentoArgs
from pipeline.core.dataset import read_manifest
from pipeline.params import ParamsError, load_params
from tests.ingested import items_of
from tests.test_audio_checks import tone
from tests.stage_runs import VALIDATE, details, problems
from tests.closed_network import leaving, run_closed

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")


def bento_args(modality: str) -> BentoArgs:
    """The arguments a Bento of a `modality` model is built with from params.yaml."""
    return BentoArgs(model_tag="kiln-classifier:test", serve=PARAMS.serve,
                     limits=getattr(PARAMS, modality).serve)
SIDE = 32  # px, the repo's image.preprocess.image_size
RATE = 16000  # Hz, the repo's audio.preprocess.sample_rate


def ingest_and_validate(stage, work: Path) -> tuple[int, str]:
    """Ingest (which must pass), then validate: validate's exit code, both stages' output."""
    code, ingested = stage(work, "ingest", "--out", "data/ingested")
    assert code == 0, ingested
    code, validated = stage(work, *VALIDATE)
    return code, ingested + validated


# --- images ------------------------------------------------------------------------------------

def noise(seed: int, channels: int = 1) -> np.ndarray:
    shape = (SIDE, SIDE) if channels == 1 else (SIDE, SIDE, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def image_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


# (suffix, PIL format, mode written): every accepted format, in the modes cameras, scanners and
# the web write them
WRITTEN = [(".png", "PNG", "L"), (".jpg", "JPEG", "RGB"), (".webp", "WEBP", "RGB"),
           (".bmp", "BMP", "L"), (".tiff", "TIFF", "I;16"), (".tif", "TIFF", "RGB"),
           (".gif", "GIF", "P")]


def picture(seed: int, mode: str) -> Image.Image:
    if mode == "I;16":  # 16-bit gray, as scanners write TIFF
        return Image.fromarray(noise(seed).astype(np.uint16) * 257)
    if mode == "P":
        return Image.fromarray(noise(seed)).convert("P")
    return Image.fromarray(noise(seed, 3 if mode == "RGB" else 1)).convert(mode)


def mixed_folder(root: Path, classes=("cat", "dog", "owl"), per_format: int = 2) -> Path:
    """<class>/<n><suffix>: per_format images of every WRITTEN format per class, distinct noise."""
    seed = 100
    for label in classes:
        (root / label).mkdir(parents=True)
        for suffix, fmt, mode in WRITTEN:
            for i in range(per_format):
                seed += 1
                (root / label / f"{fmt.lower()}{i}{suffix}").write_bytes(
                    image_bytes(picture(seed, mode), fmt))
    return root


def test_a_folder_of_every_accepted_image_format_ingests_and_validates_every_file(
        tmp_path, project, stage):
    """42 images in 6 formats, a camera JPEG with a preview after its main picture (MPO) and a
    WebP saved as .jpg among them: all copied, all decoded, counted per format; nothing is
    skipped."""
    source = mixed_folder(tmp_path / "src")
    mpo = Image.fromarray(noise(7, 3))
    (source / "owl/camera.jpg").write_bytes(image_bytes(
        mpo, "MPO", save_all=True, append_images=[mpo.resize((8, 8))]))
    (source / "cat/saved_from_the_web.jpg").write_bytes(image_bytes(
        Image.fromarray(noise(8, 3)), "WEBP"))
    work = project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    assert "ingest: 44 images from " in out and "skipped" not in out
    assert "validate: 44 images, 3 classes" in out and ", 0 failed;" in out
    assert "validate: decoded images by format: BMP 6, GIF 6, JPEG 6, MPO 1, PNG 6, TIFF 12, " \
        "WEBP 7" in out
    metrics = json.loads((work / "reports/validation_details.json").read_text())
    assert metrics["undecodable"] == 0 and sum(metrics["formats"].values()) == 44
    # converted to image.preprocess.channels 1 (L), counted by the mode each was written in
    assert metrics["converted"] == {"I;16": 6, "P": 6, "RGB": 20}


ONE_PICTURE = "Kiln takes one picture per file; save the one you mean as a file of its own"


def spoil_frames(source: Path) -> list[str]:
    """Files PIL reads that are not one picture: which frame or page is the one to learn from
    is not Kiln's guess to make."""
    frames = [Image.fromarray(noise(s)) for s in (60, 61, 62)]
    for path, fmt in (("cat/animated.gif", "GIF"), ("cat/animated.webp", "WEBP"),
                      ("dog/scan.tiff", "TIFF")):
        (source / path).write_bytes(image_bytes(frames[0], fmt, save_all=True,
                                                append_images=frames[1:]))
    return [f"several frames: cat/animated.gif (several frames (an animated GIF): {ONE_PICTURE})",
            f"several frames: cat/animated.webp (several frames (an animated WEBP): "
            f"{ONE_PICTURE})",
            f"several frames: dog/scan.tiff (several pages (a multi-page TIFF): {ONE_PICTURE})"]


def spoil_cut(source: Path) -> list[str]:
    """Interrupted copies of a WebP and a GIF, and float pixels no range is known for."""
    webp = image_bytes(Image.fromarray(noise(64, 3)), "WEBP")
    (source / "owl/half.webp").write_bytes(webp[:len(webp) // 2])
    gif = image_bytes(Image.fromarray(noise(65)), "GIF")
    (source / "owl/half.gif").write_bytes(gif[:len(gif) // 2])
    (source / "dog/depth.tif").write_bytes(image_bytes(
        Image.fromarray(np.random.default_rng(63).random((SIDE, SIDE), np.float32), "F"), "TIFF"))
    return ["truncated WebP: owl/half.webp (OSError: ",
            "truncated GIF: owl/half.gif (OSError: image file is truncated",
            "unconvertible pixels: dog/depth.tif (32-bit float pixels, whose range Kiln cannot "
            "know: save it with 8- or 16-bit pixels)"]


def spoil_corrupt(source: Path) -> list[str]:
    """Whole files whose insides are damaged, and an icon (PIL reads it; Kiln and its server do
    not) named .bmp."""
    bmp = bytearray(image_bytes(Image.fromarray(noise(66)), "BMP"))
    bmp[10:14] = (len(bmp) + 100).to_bytes(4, "little")  # pixel data said to start past the end
    (source / "owl/broken.bmp").write_bytes(bytes(bmp))
    tiff = bytearray(image_bytes(Image.fromarray(noise(67)), "TIFF", compression="tiff_lzw"))
    tiff[8:40] = bytes(32)  # the first directory's entries zeroed
    (source / "cat/broken.tif").write_bytes(bytes(tiff))
    (source / "dog/icon.bmp").write_bytes(image_bytes(Image.fromarray(noise(68)), "ICO"))
    return ["corrupt BMP: owl/broken.bmp (",
            "corrupt TIFF: cat/broken.tif (",
            "not an accepted image: dog/icon.bmp (ICO image; accepted: PNG, JPEG, WebP, BMP, "
            "TIFF or GIF)"]


@pytest.mark.parametrize("spoil", [spoil_frames, spoil_cut, spoil_corrupt],
                         ids=lambda f: f.__name__[6:])
def test_images_kiln_does_not_take_are_named_each_with_why(tmp_path, project, stage, spoil):
    source = mixed_folder(tmp_path / "src", per_format=1)
    expected = spoil(source)
    work = project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "ingest: 24 images from " in out and "skipped" not in out  # taken, then judged
    assert "kiln validate: error:" in out and "unreadable image file: Every file is one " \
        "complete picture (PNG, JPEG, WebP, BMP, TIFF or GIF) that decodes" in out
    assert "-- 3 break it: " in out
    for line in expected:
        assert line in out, (line, out)
    assert problems(work)["unreadable_files"] == 3
    found = json.loads((work / "reports/validation_details.json").read_text())["file_problems"]
    assert sum(found.values()) == 3


def image_card() -> SimpleNamespace:
    """What the image serving part reads of a card: its preprocessing."""
    return SimpleNamespace(preprocessing=Preprocessing(
        image_size=SIDE, channels=1, mean=[0.5], std=[0.25], background=0))


@pytest.mark.parametrize("suffix,fmt,mode", WRITTEN, ids=[w[0][1:] for w in WRITTEN])
def test_the_service_decodes_every_accepted_image_as_training_does(tmp_path, suffix, fmt, mode):
    """pipeline/modalities/image/serving.py on an upload's bytes: the pixels the model is given are those
    training loads from the same file (Preprocessing.load)."""
    path = tmp_path / f"upload{suffix}"
    path.write_bytes(image_bytes(picture(5, mode), fmt))
    card = image_card()
    opened = image_serving.image(path.read_bytes(), card, bento_args("image"))
    served = image_serving.image_pixels(opened, card)
    assert served.shape == (1, 1, SIDE, SIDE)
    assert np.array_equal(served[0], card.preprocessing.load(path))


def test_the_service_refuses_what_validate_refuses_with_the_same_words():
    frames = [Image.fromarray(noise(s)) for s in (1, 2)]
    cases = {
        "animated GIF": (image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                         "image: several frames (an animated GIF): Kiln takes one picture"),
        "multi-page TIFF": (image_bytes(frames[0], "TIFF", save_all=True,
                                        append_images=frames[1:]),
                            "image: several pages (a multi-page TIFF)"),
        "float TIFF": (image_bytes(Image.fromarray(np.zeros((4, 4), np.float32), "F"), "TIFF"),
                       "image: 32-bit float pixels"),
        "an icon": (image_bytes(frames[0], "ICO"),
                    "image: not a PNG, JPEG, WebP, BMP, TIFF or GIF file"),
    }
    for case, (data, message) in cases.items():
        with pytest.raises(ValueError) as refused:
            image_serving.image(data, image_card(), bento_args("image"))
        assert str(refused.value).startswith(message), (case, str(refused.value))


# --- audio ---------------------------------------------------------------------------------------

def aac_file(samples: np.ndarray, rate: int, muxer: str = "ipod", codec: str = "aac") -> bytes:
    """Mono float samples encoded by FFmpeg (PyAV): an M4A file (muxer "ipod", as phones write)
    or an ADTS stream ("adts", a .aac file); codec "alac" for Apple Lossless."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=muxer) as media:
        stream = media.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None].astype(np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            media.mux(packet)
    return out.getvalue()


def mp3_file(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="MP3", subtype="MPEG_LAYER_III")
    return out.getvalue()


def wav_file(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# suffix -> how a clip is written: a phone's M4A, an MP3, a raw AAC stream, a WAV
WRITERS = {".m4a": aac_file, ".mp3": mp3_file,
           ".aac": lambda s, r: aac_file(s, r, muxer="adts"), ".wav": wav_file}


def recordings(root: Path, per_class: int = 4) -> Path:
    """train/ val/ test/ <class>/<n><suffix>: faded tones, each its own pitch, length and level,
    in turn in every WRITERS format, at 22,050 or 44,100 Hz."""
    rng = np.random.default_rng(3)
    n = 0
    for split in ("train", "val", "test"):
        for label, hz in (("whistle", 1500.0), ("hum", 180.0)):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                suffix = list(WRITERS)[n % len(WRITERS)]
                rate = (22050, 44100)[n % 2]
                n += 1
                samples = tone(hz * rng.uniform(0.85, 1.15), rng.uniform(0.3, 0.7),
                               rng.uniform(0.2, 0.5), rate)
                (root / split / label / f"{i}{suffix}").write_bytes(
                    WRITERS[suffix](samples * np.hanning(len(samples)), rate))
    return root


def test_mp3_m4a_and_aac_recordings_ingest_and_validate(tmp_path, audio_project, stage):
    work = audio_project(recordings(tmp_path / "src"))
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    assert "ingest: 24 clips from " in out and "skipped" not in out
    assert "validate: 24 clips, 2 classes" in out and ", 0 failed;" in out
    assert "validate: recorded as AAC AAC 6, MP3 MPEG_LAYER_III 6, MP4 AAC 6, WAV PCM_16 6; " \
        "22050 Hz 12, 44100 Hz 12; 1 channel 24; decoded to mono at 16000 Hz" in out
    assert details(work)["undecodable"] == 0


def test_cut_or_unaccepted_recordings_are_named(tmp_path, audio_project, stage):
    """An MP3 cut short decodes up to the cut (as a WAV does): its header's length names it. An
    M4A cut in half, and Apple Lossless in an M4A, are refused by decode.py."""
    source = recordings(tmp_path / "src")
    whole = mp3_file(tone(600, 0.6, rate=22050), 22050)
    (source / "val/hum/cut.mp3").write_bytes(whole[:len(whole) * 6 // 10])
    m4a = aac_file(tone(700, 0.6, rate=22050), 22050)
    (source / "train/whistle/half.m4a").write_bytes(m4a[:len(m4a) // 2])
    (source / "test/hum/lossless.m4a").write_bytes(aac_file(tone(800, 0.6, rate=22050), 22050, codec="alac"))
    work = audio_project(source)
    code, out = ingest_and_validate(stage, work)
    assert code == 1
    assert "-- 3 break it: " in out
    assert re.search(r"truncated MP3: val/hum/cut\.mp3 \(its header declares 0\.60 s, 0\.\d\d s "
                     r"decode\)", out), out
    assert "corrupt or not audio: train/whistle/half.m4a (cannot be decoded" in out
    assert ("unaccepted format: test/hum/lossless.m4a (its ALAC audio is not accepted (MP4 "
            "files: AAC only))") in out
    assert {k: v for k, v in details(work)["file_problems"].items() if v} == {
        "truncated_mp3": 1, "corrupt_or_not_audio": 1, "unaccepted_format": 1}


def audio_card() -> SimpleNamespace:
    """What the audio serving part reads of a card: preprocessing and audio.preprocess.silent_rms."""
    return SimpleNamespace(preprocessing=AudioPreprocessing(
        sample_rate=RATE, clip_samples=clip_length(RATE, 1.0)),
        recipe=SimpleNamespace(section=PARAMS.audio))


@pytest.mark.parametrize("suffix", WRITERS)
def test_the_service_decodes_every_recording_as_training_does(tmp_path, suffix):
    """/classify_audio's parser gets the clip training loads from the same file
    (AudioPreprocessing.load), whatever the upload's name."""
    data = WRITERS[suffix](tone(440, 0.8, rate=44100), 44100)
    (tmp_path / f"clip{suffix}").write_bytes(data)
    card = audio_card()
    served = audio_serving.audio(SimpleNamespace(filename=f"upload{suffix}",
                                                 file=io.BytesIO(data)), card, bento_args("audio"))
    assert np.array_equal(served[0], card.preprocessing.load(tmp_path / f"clip{suffix}"))
    assert np.array_equal(served, audio_serving.audio(data, card, bento_args("audio")))  # no name


def test_an_mp3_or_m4a_too_long_for_the_service_is_refused_before_it_is_decoded():
    """An MP3's Xing tag and an M4A's sample tables give the length before any sample is
    decoded; an ADTS stream has none, and is refused once decoding passes the bound."""
    long = tone(300, 3.0, rate=22050)
    for data, seconds in ((mp3_file(long, 22050), "3.00"), (aac_file(long, 22050), "3.0")):
        with pytest.raises(AudioError, match=rf"^audio: {seconds}\d* s long, over the 2 s "):
            decode(data, RATE, max_seconds=2.0)
    with pytest.raises(AudioError, match=r"^audio: 2\.0\d s long, over the 2 s allowed"):
        decode(aac_file(long, 22050, muxer="adts"), RATE, max_seconds=2.0)


def test_a_whole_mp3_or_m4a_is_no_truncation_and_a_cut_mp3_is():
    samples = tone(500, 0.5, rate=22050)
    assert truncation(decode(mp3_file(samples, 22050), RATE)) is None
    assert truncation(decode(aac_file(samples, 22050), RATE)) is None
    mp3 = mp3_file(samples, 22050)
    cut = decode(mp3[:len(mp3) // 2], RATE, name="cut.mp3")
    assert cut.declared_seconds == 0.5 and cut.seconds < 0.3
    assert truncation(cut).startswith("its header declares 0.50 s, 0.")


def test_decoding_mp3_m4a_and_aac_sends_nothing(closed_network, tmp_path):
    """PyAV (FFmpeg) and libsndfile's mpg123, imported and decoding in a network namespace with
    only loopback, under strace: no connect, sendto or sendmsg leaves it."""
    paths = []
    for suffix, write in WRITERS.items():
        paths.append(tmp_path / f"clip{suffix}")
        paths[-1].write_bytes(write(tone(440, 0.5, rate=22050), 22050))
    script = ("import sys; from pipeline.modalities.audio.decode import decode; "
              "print([decode(p, 16000).format for p in sys.argv[1:]])")
    done = run_closed([sys.executable, "-c", script, *map(str, paths)], tmp_path / "trace",
                      timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['MP4', 'MP3', 'AAC', 'WAV']"
    assert not leaving(tmp_path / "trace")


# --- text ----------------------------------------------------------------------------------------

TICKETS = {"refund": "money back charge wrong twice invoice".split(),
           "bug": "crash freeze error button screen broken".split()}


def tickets(n_per_class: int = 10, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label): generated support tickets, some quoting the app's words, as people do."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in TICKETS.items():
        for i in range(n_per_class):
            text = " ".join(rng.choice(words, 7))
            rows.append((f'"{text}" said the app' if i % 3 == 0 else text, label))
    return rows


def test_a_tsv_with_its_own_column_names_and_splits_ingests_and_validates(
        tmp_path, text_project, stage):
    """IANA TSV: no quoting, so quotes are text and reach the ingested file as written."""
    rows = tickets()
    splits = ["train"] * 7 + ["val"] + ["test"] * 2
    path = tmp_path / "tickets.tsv"
    path.write_text("id\tsubset\tcategory\tbody\n" + "".join(
        f"{n}\t{splits[n % 10]}\t{label}\t{text}\n" for n, (text, label) in enumerate(rows)),
        encoding="utf-8")
    work = text_project(path, ingest={"item_column": "body", "label_column": "category",
                                           "split_column": "subset"})
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    assert "ingest: 20 texts from " in out and "{'train': 14, 'val': 2, 'test': 4}" in out
    ingested = items_of(work / "data/ingested")
    assert [r["source"] for r, _ in ingested[:2]] == ["tickets.tsv:line 2", "tickets.tsv:line 3"]
    assert ingested[0][1].decode("utf-8") == rows[0][0]
    assert rows[0][0].startswith('"')


def test_a_csv_with_other_column_names_and_no_split_ingests_and_validates(
        tmp_path, text_project, stage):
    path = tmp_path / "export.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Message", "Intent", "Agent"])
        writer.writerows([text, label, "kim"] for text, label in tickets(seed=1))
    work = text_project(path, ingest={"item_column": "Message", "label_column": "Intent"})
    code, out = ingest_and_validate(stage, work)
    assert code == 0, out
    assert "ingest: 20 texts from " in out and "{'train': 14, 'val': 2, 'test': 4}" in out
    assert read_manifest(work / "data/ingested")[1] == ["bug", "refund"]


@pytest.mark.parametrize("name,content,message", [
    ("a.csv", "Message,Agent\nhello,kim\n",
     "line 1: the header names no `body` column (ingest.item_column); it has `Message`, `Agent`"),
    ("a.tsv", "body\tAgent\nhello\tkim\n",
     "line 1: the header names no `category` column (ingest.label_column); it has `body`, "
     "`Agent`"),
    ("a.jsonl", '{"body": "hello", "category": "x"}\n{"text": "hi", "category": "y"}\n',
     "line 2: no `body` field (ingest.item_column; the record has `text`, `category`)"),
    ("a.tsv", "body\tcategory\nhello\tx\textra\n", "line 2: 3 fields, the header has 2"),
])
def test_a_missing_column_stops_ingest_naming_file_column_and_columns_found(
        tmp_path, text_project, stage, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    work = text_project(tmp_path / name, ingest={"item_column": "body",
                                                 "label_column": "category"})
    code, out = stage(work, "ingest", "--out", "data/ingested")
    assert code == 1
    assert f"kiln ingest: error: text.ingest.source {tmp_path / name}: {message}" in out, out


def test_two_params_naming_one_column_are_refused(params_writer, tmp_path):
    with pytest.raises(ParamsError, match="ingest.label_column: item_column, label_column and "
                                          "split_column must name three different columns"):
        load_params(params_writer(tmp_path, {"ingest": {"item_column": "label"}}))
