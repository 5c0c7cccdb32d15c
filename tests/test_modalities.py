"""The seven stages for every registered modality, as a user runs them: a fresh project, a
folder of data the test generates (not the built-in demo: other classes, sizes and formats),
the real params.yaml shrunk (tests/conftest.py) with a small model, and `dvc repro`. Each run
ends with a packaged Bento that answered the test split through every protocol as evaluate did
(the package stage's infra validation), and `dvc status` then has nothing to say.

The layout's test is the fourth case: a toy modality is one folder. tests/modality_points/
(classes of points in a few dimensions) copied to pipeline/modalities/points/ of the project,
with its params section, and nothing else: no registration, no stage, dvc.yaml or
bentofile.yaml line (DVC's deps follow the folder: pipeline/modalities/${data.modality}); its
Bento serves points over gRPC and answers another modality's endpoint with 400 naming where
points go."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from pipeline.core.card import onnx_predictor, read_card
from pipeline.core.dataset import load_split, read_manifest
from pipeline.core.modality import card_part
from pipeline.modalities import MODALITIES
from tests.ingested import items_of
from pipeline.serving import oip
from pipeline.stages.__main__ import STAGES
from tests.bento_server import bento_server
from tests.conftest import merged, write_params
from tests.languages import write_language_folder
from tests.project import copy_repo, dvc, ran_stages, run

TOY = Path(__file__).resolve().parent / "modality_points"
REAL = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


SHAPES = ("ring", "bar", "wedge")


def draw(shape: str, rng: np.random.Generator) -> Image.Image:
    """A photo-like JPEG subject: one shape of a random colour, size and place on a noisy
    background of another colour, in a random frame size."""
    side = int(rng.integers(48, 97))
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 12, (side, side, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    ink = tuple(int(c) for c in (255 - background + rng.integers(-40, 41, 3)) % 256)
    size = side * rng.uniform(0.35, 0.6)
    cx, cy = rng.uniform(size / 2 + 2, side - size / 2 - 2, 2)
    box = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
    pen = ImageDraw.Draw(image)
    if shape == "ring":
        pen.ellipse(box, outline=ink, width=max(2, int(size / 8)))
    elif shape == "bar":
        width = size / 5
        pen.rectangle([cx - width, box[1], cx + width, box[3]], fill=ink)
    else:
        pen.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=ink)
    return image


def photos(root: Path) -> tuple[Path, dict]:
    """A user's own photos: 110 JPEGs per shape, 330 in all (the size of the folder the digits'
    0.97 floor once refused), LeNet-5 with the real training budget."""
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
        for i in range(110):
            draw(shape, rng).save(root / shape / f"IMG_{i:04d}.jpg", quality=90)
    return root, {"train": {"max_epochs": REAL["image"]["train"]["max_epochs"]}}


def languages(root: Path) -> tuple[Path, dict]:
    """Texts in six languages, 60 each (tests/languages.py), a 16-wide encoder of 4 heads
    trained one epoch: too short to tell the languages apart, so TF-IDF + LR is served."""
    from tests.test_text_model import TEXT

    return write_language_folder(root, per_class=60, seed=3), merged(
        TEXT, {"train": {"max_epochs": 1}})


def tones(root: Path) -> tuple[Path, dict]:
    """Fading tones of two pitches in train/val/test folders (tests/test_audio_checks.py), an
    8-wide Conv1D."""
    from tests.test_audio_checks import write_folder
    from tests.test_audio_model import AUDIO

    return write_folder(root, per_class=8), AUDIO


def points(root: Path) -> tuple[Path, dict]:
    """The toy modality's generated blobs; its folder copied into the project first."""
    shutil.copytree(TOY, root.parent / "pipeline/modalities/points",
                    ignore=shutil.ignore_patterns("__pycache__", "params.yaml"))
    section = yaml.safe_load((TOY / "params.yaml").read_text())["points"]
    return section["ingest"]["source"], section


CASES = {"image": photos, "text": languages, "audio": tones, "points": points}


@pytest.fixture(scope="module", params=[*MODALITIES, "points"])
def reproduced(request, tmp_path_factory) -> tuple[str, Path, str]:
    """(modality, project, `dvc repro`'s output) of one run of the seven stages."""
    modality = request.param
    assert modality in CASES, f"{modality}: a registered modality without a case here"
    root = copy_repo(tmp_path_factory.mktemp(modality))
    source, own = CASES[modality](root / "source")
    write_params(root, {"data": {"modality": modality},
                        modality: {**own, "ingest": {**own.get("ingest", {}),
                                                     "source": str(source)}}})
    return modality, root, dvc(root, "repro").stdout


@pytest.mark.slow
def test_the_seven_stages_run_package_and_are_up_to_date(reproduced, tmp_path):
    modality, root, out = reproduced
    assert ran_stages(out) == list(STAGES)
    evaluation = json.loads((root / "reports/evaluation.json").read_text())
    selected = evaluation["selected"]
    card = json.loads((root / "models/selected/model.json").read_text())
    assert card["recipe"]["data"]["modality"] == modality
    assert card["selection"]["variant"] == selected
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert card["recipe"]["section"]["train"]["max_epochs"] == \
        params[modality]["train"]["max_epochs"]
    rows = read_manifest(root / "data/ingested")[0]
    tests = sum(r["split"] == "test" for r in rows)
    assert re.search(rf"infra validation \({tests} test \w+ through ", out), out[-3000:]
    package = json.loads((root / "reports/package.json").read_text())
    assert package["challenger_serves"] and \
        package["challenger"]["accuracy"] == evaluation["accuracy"][selected]
    assert json.loads(dvc(root, "status", "--json").stdout) == {}
    if modality in MODALITIES:  # the toy's code is in its project only: served_points
        predict = onnx_predictor(root / "models/selected/model.onnx", 1)
        card = read_card(root / "models/selected")
        items, y = load_split(root / "data/ingested", "test", card.preprocessing)
        x = card_part(card, "serving").model_input(root / "models/selected", card)(items)
        assert (predict(x).argmax(1) == y).mean() == pytest.approx(
            evaluation["accuracy"][selected], abs=1e-5)  # evaluate rounds
    {"image": beats_the_baselines, "text": tokens_and_heads, "audio": waveforms_and_channels,
     "points": served_points}[modality](root, out, tmp_path)


def beats_the_baselines(root: Path, out: str, tmp_path: Path) -> None:
    """The user's photos pass the default gate (the baselines' bar alone) by a clear margin."""
    evaluation = json.loads((root / "reports/evaluation.json").read_text())
    selected = evaluation["selected"]
    best = max(v["accuracy"] for k, v in evaluation.items() if k.startswith("baseline_"))
    assert evaluation["baseline_majority"]["accuracy"] < 0.5
    assert evaluation["accuracy"][selected] > best + 0.2  # a clear win
    assert REAL["gate"]["min_accuracy"] is None  # the default gate: the baselines' bar alone


def tokens_and_heads(root: Path, out: str, tmp_path: Path) -> None:
    """A text run: augment's tokenizer is what train records (no augmented copies are stored:
    training draws them) and compress prunes attention heads; one epoch of the encoder cannot tell six languages apart, TF-IDF + LR can:
    the gate selects the baseline, whose ONNX graph reads the texts themselves (non-ASCII
    scripts too), and the package stage served it (infra validation: REST and gRPC)."""
    from tests.test_text_model import TEXT
    from pipeline.modalities.text import preprocess as tokens

    aug = root / "data/augmented"
    assert sorted(f.name for f in aug.iterdir()) == ["preprocessing.json", "tokenizer.json"]
    prep = tokens.TextPreprocessing(**json.loads((aug / "preprocessing.json").read_text()))
    assert tokens.load(aug, prep).get_vocab_size() <= TEXT["preprocess"]["vocab_size"]
    card = read_card(root / "models/float")
    assert card.architecture == "text_encoder" and card.preprocessing == prep
    assert (root / "models/float/tokenizer.json").read_bytes() == \
        (aug / "tokenizer.json").read_bytes()
    report = json.loads((root / "models/compressed/compress.json").read_text())
    assert report["heads"] == {"layers.0.attention": 2}  # half of 4
    assert report["macs"]["pruned.onnx"] < report["macs"]["float.onnx"]
    assert report["size_bytes"]["pruned.onnx"] < report["size_bytes"]["float.onnx"]
    evaluation = json.loads((root / "reports/evaluation.json").read_text())
    assert evaluation["selected"] == "baseline_tfidf_lr"
    assert evaluation["accuracy"]["baseline_tfidf_lr"] == \
        evaluation["baseline_tfidf_lr"]["accuracy"]  # the served graph scores as scikit-learn
    assert evaluation["accuracy"]["baseline_tfidf_lr"] > max(
        v for k, v in evaluation["accuracy"].items() if k != "baseline_tfidf_lr")
    selected = root / "models/selected"
    card = read_card(selected)
    assert card.architecture == "baseline_tfidf_lr"
    model_input = card_part(card, "serving").model_input(selected, card)
    texts = ["Рыв лаквывдок radio рык бавбав", "Taši čižaj žijšajti šivaj"]
    probabilities = onnx_predictor(selected / "model.onnx", 1)(model_input(texts))
    assert [card.classes[i] for i in probabilities.argmax(1)] == ["bralov", "tavasi"]
    assert "gRPC ModelInfer" in out and "/classify_text" in out


def waveforms_and_channels(root: Path, out: str, tmp_path: Path) -> None:
    """An audio run: augment's preprocessing record alone, compress's halved channels, evaluate's baselines on
    log-mel band statistics (the logistic regression servable: its graph takes waveforms)."""
    from tests.test_audio_model import AUDIO

    assert sorted(f.name for f in (root / "data/augmented").iterdir()) == ["preprocessing.json"]
    rate = yaml.safe_load((root / "params.yaml").read_text())["audio"]["preprocess"]["sample_rate"]
    assert read_card(root / "models/float").preprocessing.clip_samples == rate
    card = read_card(root / "models/float")
    assert card.architecture == "conv1d"
    report = json.loads((root / "models/compressed/compress.json").read_text())
    assert report["pruned_widths"]["body.0"] == [AUDIO["train"]["width"] // 2,
                                                 AUDIO["train"]["n_mels"]]
    assert report["macs_of"] == "one clip of 1 s"
    evaluation = json.loads((root / "reports/evaluation.json").read_text())
    assert evaluation["baseline_majority"]["accuracy"] == 0.5  # two classes, 8 test clips each
    logreg = evaluation["baseline_logreg"]
    assert logreg["servable"] and logreg["accuracy"] > 0.9  # tones apart in frequency


def served_points(root: Path, out: str, tmp_path: Path) -> None:
    """The toy's run: its recipe in the card, and its Bento serving points over gRPC while the
    text endpoint answers 400 naming where points go."""
    assert "ingest: 180 points from blobs" in out
    evaluation = json.loads((root / "reports/evaluation.json").read_text())
    assert evaluation["accuracy"][evaluation["selected"]] >= 0.9  # three separated blobs
    card = json.loads((root / "models/selected/model.json").read_text())
    assert card["recipe"]["section"]["train"] == yaml.safe_load(
        (TOY / "params.yaml").read_text())["points"]["train"]
    assert "infra validation (36 test points through gRPC ModelInfer)" in out
    bento = run(root, sys.executable, "-m", "pipeline.lifecycle.champion", "bento",
                "--champion", "reports/champion.json", "--export", "models/champion").stdout.strip()
    from open_inference.grpc import protocol as pb
    from open_inference.grpc.service import GRPCInferenceServiceStub

    test = [data for row, data in items_of(root / "data/ingested", "test")
            if row["label"] == "east"][:2]
    points = np.array([np.array(p.decode().split(), np.float32) for p in test])
    with bento_server(bento, root / ".bentoml", tmp_path / "serve.log") as (client, _):
        refused = client.post("/classify_text", json={"text": "hello"})
        assert refused.status_code == 400 and "send points to gRPC ModelInfer" in refused.text
        with grpc.insecure_channel(f"127.0.0.1:{client.grpc_port}") as channel:
            name, version = card_tag(root).split(":")
            answer = GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
                model_name=name, model_version=version,
                inputs=[{"name": "points", "datatype": "FP32", "shape": list(points.shape)}],
                raw_input_contents=[points.astype("<f4").tobytes()]), timeout=30)
    assert (oip.probabilities_of(answer).argmax(1) == 0).all()  # "east", the first class


def card_tag(root: Path) -> str:
    """The champion's model tag, as the package report names it."""
    return json.loads((root / "reports/package.json").read_text())["champion"]["model_tag"]
