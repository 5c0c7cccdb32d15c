"""Per-stage unit tests on tiny data: ingest, preprocessing, augment, models, train, compress, gate."""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import StageError
from pipeline.core.card import CARD_FILE, onnx_predictor, read_card
from pipeline.core.pruning import PRUNERS, is_structured
from pipeline.stages.compress import (
    prune_and_finetune,
    quantize_int8,
    sparsity,
)
from pipeline.core.dataset import ShardWriter, data_hash, load_split, read_manifest
from pipeline.stages.evaluate import gate, refusal
from pipeline.modalities.image.sources import ingest_images
from pipeline.modalities.image.config import Augment as ImageAugment
from pipeline.params import CompressParams, GateParams, Split, load_params
from pipeline.modalities.image import export, models
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.modalities.image.warp import DRAWS, warp
from pipeline.core.training import fit
from tests.ingested import items_of
from tests.streams import tensors

REPO = Path(__file__).resolve().parents[1]
SPLIT = Split(train=0.6, val=0.2, test=0.2)
MAX_FILE_BYTES = load_params(REPO / "params.yaml").ingest.max_file_bytes
PREP = Preprocessing(image_size=32, channels=1, mean=[0.5], std=[0.25])


def image_folder(root: Path, classes=("cat", "dog"), per_class=10, presplit=False) -> Path:
    """Class folders of random images in mixed sizes, modes and formats."""
    rng = np.random.default_rng(0)
    splits = ("train", "val", "test") if presplit else ("",)
    for s in splits:
        for c in classes:
            folder = root / s / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
                rgb = i % 2 == 0
                pixels = rng.integers(0, 256, (*size[::-1], 3) if rgb else size[::-1], dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}{i}.{'png' if i % 3 else 'jpg'}")
            (folder / ".DS_Store").write_bytes(b"\0\1")
    return root


def ingest(source: str, out: Path, seed: int) -> list[dict]:
    """ingest_images of `source` into the shards of `out`; the ingested rows."""
    with ShardWriter(out, 1 << 30, 1 << 26) as writer:
        writer.close(ingest_images(source, writer, SPLIT, seed=seed,
                                   max_file_bytes=MAX_FILE_BYTES))
    return read_manifest(out)[0]


def warped(n: int, out: Path) -> dict[str, bytes]:
    """The built-in warped_digits source of n items (params.yaml's split and seed) ingested into
    `out` in shards of about 40 items: every file's bytes by name."""
    from pipeline.modalities.image.warped import warped_digits

    with ShardWriter(out, 40, 1 << 26) as writer:
        for item in warped_digits(n, SPLIT, 0):
            writer.add(*item)
        writer.close([str(d) for d in range(10)])
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_warped_digits_are_the_same_items_whatever_their_number(tmp_path):
    """The generated large set: item i is the same PNG whatever N, so 1% more items leave every
    shard but each split's last untouched; a test item warps a test digit of the built-in split
    only (no digit is warped into two splits); every class is in every split."""
    small, grown = warped(600, tmp_path / "a"), warped(606, tmp_path / "b")
    assert warped(600, tmp_path / "again") == small
    shards = [k for k in small if k.endswith(".parquet")]
    assert len(shards) >= 12
    changed = [k for k in shards if grown.get(k) != small[k]]
    assert len(changed) <= 3, changed  # at most the last shard of each split
    rows = read_manifest(tmp_path / "b")[0]
    assert {r["id"] for r in read_manifest(tmp_path / "a")[0]} < {r["id"] for r in rows}
    digits = {r["split"]: set() for r in rows}
    for r in rows:
        digits[r["split"]].add(int(re.search(r"sklearn digits\[(\d+)\]", r["source"])[1]))
    assert not digits["test"] & digits["train"] and not digits["val"] & digits["train"]
    built_in = {r["source"]: r["split"] for r in ingest("digits", tmp_path / "digits", seed=0)}
    assert all(built_in[f"sklearn digits[{d}]"] == split
               for split, ds in digits.items() for d in ds)
    counts = {(r["split"], r["label"]) for r in rows}
    assert len(counts) == 30
    shares = {s: sum(r["split"] == s for r in rows) / len(rows) for s in digits}
    assert abs(shares["train"] - SPLIT.train) < 0.06 and abs(shares["test"] - SPLIT.test) < 0.05
    load = Preprocessing(image_size=32, channels=1, mean=[0.0], std=[1.0], background=0).load
    pixels = np.stack([load(d) for _, d in items_of(tmp_path / "b", "test")[:50]])
    assert pixels.shape == (50, 1, 32, 32) and len({p.tobytes() for p in pixels}) == 50


def test_ingest_digits_is_stratified_and_seeded(tmp_path):
    rows = ingest("digits", tmp_path / "a", seed=1)
    again = ingest("digits", tmp_path / "b", seed=1)
    assert len(rows) == 1797 and rows == again
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {str(d) for d in range(10)}
    test_share = sum(r["split"] == "test" for r in rows) / len(rows)
    assert abs(test_share - 0.2) < 0.01
    _, classes = read_manifest(tmp_path / "a")
    assert classes == [str(d) for d in range(10)]
    assert data_hash(tmp_path / "a") == data_hash(tmp_path / "b")
    assert ingest("digits", tmp_path / "c", seed=2) != rows


def test_ingest_user_folder(tmp_path):
    rows = ingest(str(image_folder(tmp_path / "src")), tmp_path / "out", seed=0)
    assert len(rows) == 20  # .DS_Store ignored
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    pixels, labels = load_split(tmp_path / "out", "train", PREP)
    assert pixels.shape == (len(labels), 1, 32, 32) and pixels.dtype == np.uint8
    assert set(labels) == {0, 1}


def test_ingest_presplit_folder_keeps_its_split(tmp_path):
    rows = ingest(str(image_folder(tmp_path / "src", per_class=3, presplit=True)),
                  tmp_path / "out", seed=0)
    assert sorted(r["split"] for r in rows).count("val") == 6
    assert all(r["id"].startswith(f"images/{r['split']}/") for r in rows)


def test_an_unreadable_image_stops_ingest_naming_it(tmp_path, monkeypatch):
    """A file the stage may not read (no permission; these tests run as root, who may read
    anything, so the read is made to fail) stops ingest, named with the cause: validate only
    sees the bytes ingest stored."""
    source = image_folder(tmp_path / "src", per_class=3)
    locked, read_bytes = source / "dog" / "dog1.png", Path.read_bytes

    def refusing(path: Path) -> bytes:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refusing)
    with pytest.raises(StageError, match=re.escape(
            f"image.ingest.source {source}: 1 image files cannot be read: "
            "dog/dog1.png (Permission denied)")):
        ingest(str(source), tmp_path / "out", seed=0)


@pytest.mark.parametrize("make, message", [
    (lambda root: root, "is not a folder"),
    (lambda root: (root.mkdir(), root)[1], "no class subfolders"),
    (lambda root: (root.joinpath("train", "a").mkdir(parents=True), root)[1],
     "needs train/, val/ and test/"),
])
def test_ingest_rejects_bad_folders(tmp_path, make, message):
    with pytest.raises(StageError, match=message):
        ingest(str(make(tmp_path / "src")), tmp_path / "out", seed=0)


def test_preprocessing_converts_resizes_and_normalizes():
    rgb = Image.fromarray(np.full((10, 14, 3), 255, np.uint8))
    pixels = PREP.pixels(rgb)
    assert pixels.shape == (1, 32, 32) and pixels.max() == 255
    x = PREP.normalize(pixels[None])
    assert x.dtype == np.float32 and np.allclose(x, (1 - 0.5) / 0.25)
    rgb_prep = Preprocessing(image_size=16, channels=3, mean=[0, 0, 0], std=[1, 1, 1])
    assert rgb_prep.pixels(Image.new("L", (40, 40))).shape == (3, 16, 16)


def saved(image: Image.Image, path: Path, fmt: str = "PNG") -> Path:
    image.save(path, fmt)
    return path


def test_preprocessing_converts_every_mode_pil_reads(tmp_path):
    """Real PNG/JPEG files of each mode, decoded as the server and every stage decode them:
    alpha composited on the background, 16-bit scaled (not clipped), palettes expanded."""
    prep = dataclasses.replace(PREP, image_size=4, background=[10, 20, 30])
    half = np.repeat([[0, 255]], 4, axis=0).repeat(2, axis=1).astype(np.uint8)  # left 0, right 255
    gray = Image.fromarray(np.full((4, 4), 200, np.uint8))
    files = {
        "LA": saved(Image.merge("LA", (gray, Image.fromarray(half))), tmp_path / "la.png"),
        "RGBA": saved(Image.merge("RGBA", (*[gray] * 3, Image.fromarray(half))), tmp_path / "rgba.png"),
        "CMYK": saved(gray.convert("RGB").convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG"),
        "I;16": saved(Image.fromarray(np.full((4, 4), 200 * 257 + 100, np.uint16)), tmp_path / "16.png"),
    }
    palette = Image.fromarray((half // 255).astype(np.uint8), mode="P")  # index 0 left, 1 right
    palette.putpalette([255, 255, 255, 200, 200, 200])
    palette.save(tmp_path / "p.png", transparency=0)  # index 0 (white) is transparent
    files["P"] = tmp_path / "p.png"
    composited = 0.299 * 10 + 0.587 * 20 + 0.114 * 30  # the background as L, on the left half
    for mode, path in files.items():
        with Image.open(path) as image:
            assert image.mode == mode
        pixels = prep.load(path)[0]
        assert pixels.shape == (4, 4) and pixels.dtype == np.uint8
        if mode in ("LA", "RGBA", "P"):
            assert np.abs(pixels[:, :2] - composited).max() <= 1, mode
            assert (pixels[:, 2:] == 200).all(), mode
        else:
            assert (np.abs(pixels.astype(int) - 200) <= 1).all(), (mode, pixels)
    rgb = dataclasses.replace(prep, channels=3, mean=[0] * 3, std=[1] * 3).load(files["RGBA"])
    assert rgb[:, 0, 0].tolist() == [10, 20, 30] and rgb[:, 0, 3].tolist() == [200] * 3
    # a card from before image.preprocess.background (None): alpha is dropped, as it was
    assert (dataclasses.replace(prep, background=None).load(files["LA"]) == 200).all()


OLD_CARDS = REPO / "tests/cards"  # <modality>_before_sections.json: the cards of the tiny
# models (tests/tiny_bento.py, test_text_service.py, test_audio_service.py) as Kiln wrote them at
# 5259f8a, before params.yaml's modality sections


def read_old_card(tmp_path: Path, modality: str, change=lambda card: None):
    """The old card of `modality`, `change`d in place, read by read_card (weights: none, so
    none are checked)."""
    old = json.loads((OLD_CARDS / f"{modality}_before_sections.json").read_text())
    old["weights"] = {}
    change(old)
    (tmp_path / CARD_FILE).write_text(json.dumps(old))
    return old, read_card(tmp_path)


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_a_card_from_before_the_modality_sections_reads_as_today(tmp_path, modality):
    """Champions packaged before the modality sections stay readable (rollback, comparison):
    every value of the old recipe is where today's params.yaml keeps it."""
    old, card = read_old_card(tmp_path, modality)
    recipe = old["recipe"]
    own = recipe.get(modality) or {}
    assert card.recipe.data.split.test == recipe["data"]["split"]["test"]
    assert card.recipe.train.label_smoothing == recipe["train"]["label_smoothing"]
    assert card.recipe.compress.calibration_items == recipe["compress"]["calibration_images"]
    section = dataclasses.asdict(card.recipe.section)
    assert section["augment"] == (own or recipe)["augment"]
    # image's keys were in data and train; text's and audio's in their own (which overrode
    # train's budget, lr and batch size, and named the model)
    where = {**recipe["data"], **recipe["train"], **own, "warped_items": None}  # not recorded
    assert {(sub, key): value for sub in ("ingest", "preprocess", "train")
            for key, value in section[sub].items()} == \
        {(sub, key): where[key] for sub in ("ingest", "preprocess", "train")
         for key in section[sub]}
    assert section["train"]["max_epochs"] == {"image": 30, "text": 20, "audio": 15}[modality]


def test_a_card_from_before_image_background_still_reads(tmp_path):
    """Its model was trained with alpha dropped; it reads with background None, served the same."""
    def before_background(card):
        del card["preprocessing"]["background"], card["recipe"]["data"]["background"]

    _, read = read_old_card(tmp_path, "image", before_background)
    assert read.preprocessing.background is None
    assert read.recipe.section.preprocess.background is None


def test_warp_geometry_and_chunking():
    images = torch.rand(10, 2, 12, 20, generator=torch.Generator().manual_seed(0))
    def params(rotation_deg, translate, scale_min, scale_max, hflip, chunk):
        return ImageAugment(copies=1, rotation_deg=rotation_deg, translate=translate,
                             scale_min=scale_min, scale_max=scale_max, hflip=hflip, seed=0,
                             chunk=chunk)

    draws = np.random.default_rng(1).random((10, DRAWS))
    identity = warp(images, params(0.0, 0.0, 1.0, 1.0, False, chunk=3), draws)
    assert torch.allclose(identity, images, atol=1e-5)  # pixel centres map onto themselves
    mirrored = warp(images, params(0.0, 0.0, 1.0, 1.0, True, chunk=3), draws)
    flipped = [torch.allclose(out, image.flip(-1), atol=1e-5) for out, image in zip(mirrored, images)]
    kept = [torch.allclose(out, image, atol=1e-5) for out, image in zip(mirrored, images)]
    assert [f for f in flipped] == (draws[:, 4] < 0.5).tolist()
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    zoomed_out = warp(images, params(0.0, 0.0, 0.5, 0.5, False, chunk=3), draws)  # half size, centred
    assert torch.allclose(zoomed_out[..., 3:9, 5:15], F.avg_pool2d(images, 2), atol=1e-5)
    assert (zoomed_out[..., :3, :] == 0).all() and (zoomed_out[..., :, :5] == 0).all()
    small_chunks = warp(images, params(15.0, 0.1, 0.9, 1.1, True, chunk=4), draws)
    assert torch.equal(small_chunks, warp(images, params(15.0, 0.1, 0.9, 1.1, True, chunk=100), draws))
    assert torch.equal(small_chunks[3:4], warp(images[3:4], params(15.0, 0.1, 0.9, 1.1, True, chunk=4),
                                               draws[3:4]))  # an image's warp is its own


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_registered_model_builds_and_runs(name, channels):
    model = models.build(name, channels=channels, classes=7, image_size=32)
    assert model(torch.zeros(2, channels, 32, 32)).shape == (2, 7)


def test_unknown_model_names_the_key():
    with pytest.raises(StageError, match=r"image.train.model: expected one of \['lenet5', 'resnet_small'\], got 'vgg'"):
        models.build("vgg", channels=1, classes=2, image_size=32)


def separable_data(n=256):
    """Two classes told apart by which half of the image is bright."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.3, (n, 1, 32, 32)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, :, :, 16 * label:16 * label + 16] += 1.5
    return torch.from_numpy(x), torch.from_numpy(y)


def test_fit_learns_and_is_deterministic(tmp_path):
    x, y = separable_data()
    data, val = tensors(tmp_path, x, y)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = models.build("lenet5", channels=1, classes=2, image_size=32)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        epochs = []
        fit(model, data, epochs=3, batch_size=32, optimizer=optimizer, scheduler=None,
            label_smoothing=0.0, memory_format=torch.contiguous_format, cuda_graph=False,
            val=val, on_epoch=epochs.append)
        runs.append(epochs)
    assert runs[0][-1]["val_acc"] > 0.95
    assert runs[0][-1]["train_loss"] < runs[0][0]["train_loss"]
    assert [e["val_loss"] for e in runs[0]] == [e["val_loss"] for e in runs[1]]


COMPRESS = CompressParams(prune_method="l1_unstructured", prune_amount=0.5, finetune_epochs=1,
                          finetune_lr=1e-3, calibration_items=64, int8_per_channel=True,
                          int8_reduce_range=True)
# The training recipe fine-tuning follows (params.yaml train), with a batch for tiny data.
RECIPE = dataclasses.replace(models.recipe(load_params(REPO / "params.yaml")), batch_size=32, seed=0)


@pytest.mark.parametrize("method", sorted(m for m in PRUNERS if not is_structured(m)))
def test_every_mask_pruner_keeps_weights_zero_through_finetune(method, tmp_path):
    x, y = separable_data(64)
    data, _ = tensors(tmp_path, x, y)
    pruned = {}
    for epochs in (0, 1):
        torch.manual_seed(0)
        model = models.build("lenet5", channels=1, classes=2, image_size=32)
        assert sparsity(model) == 0
        p = CompressParams(**{**COMPRESS.__dict__, "prune_method": method, "finetune_epochs": epochs})
        pruned[epochs] = prune_and_finetune(model, data, x[:1], p, RECIPE)
    zero_before = [w == 0 for w in pruned[0].state_dict().values()]
    zero_after = [w == 0 for w in pruned[1].state_dict().values()]
    assert sparsity(pruned[0]) > 0.01
    assert all(torch.equal(a, b) for a, b in zip(zero_before, zero_after))
    assert not all(torch.equal(a, b) for a, b in zip(pruned[0].state_dict().values(),
                                                     pruned[1].state_dict().values()))
    assert not any(name.endswith("_orig") for name in pruned[1].state_dict())  # masks baked in


def test_unknown_pruner_names_the_key(tmp_path):
    x, y = separable_data(8)
    data, _ = tensors(tmp_path, x, y)
    model = models.build("lenet5", channels=1, classes=2, image_size=32)
    with pytest.raises(StageError, match="compress.prune_method: expected one of .*, got 'magic'"):
        prune_and_finetune(model, data, x[:1], CompressParams(**{**COMPRESS.__dict__, "prune_method": "magic"}),
                           dataclasses.replace(RECIPE, batch_size=8))


def test_onnx_export_and_int8_match_torch(tmp_path):
    x, y = separable_data(128)
    torch.manual_seed(0)
    model = models.build("lenet5", channels=1, classes=2, image_size=32)
    fit(model, tensors(tmp_path / "data", x, y)[0], epochs=2, batch_size=32,
        optimizer=torch.optim.Adam(model.parameters(), 2e-3), scheduler=None,
        label_smoothing=0.0, memory_format=torch.contiguous_format, cuda_graph=False)
    model.eval()
    export.export_onnx(model, PREP, tmp_path / "float.onnx")
    quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx", x[:64].numpy(),
                  per_channel=True, reduce_range=True, export=export)
    with torch.no_grad():
        expected = model(x).numpy()
    float_logits = onnx_predictor(tmp_path / "float.onnx", threads=1)(x.numpy())
    int8_logits = onnx_predictor(tmp_path / "int8.onnx", threads=1)(x.numpy())
    assert np.allclose(float_logits, expected, atol=1e-4)  # dynamic batch of 128, exported at 2
    assert (int8_logits.argmax(1) == expected.argmax(1)).mean() > 0.95
    assert (tmp_path / "int8.onnx").stat().st_size < 0.5 * (tmp_path / "float.onnx").stat().st_size


def results(**accuracy):
    """(metrics, servable, latency) per variant, as evaluate passes them to the gate."""
    return ({name: {"accuracy": acc, "size_bytes": size} for name, (acc, size, _) in accuracy.items()},
            {name: name != "float_torch" for name in accuracy},
            {name: {"latency_ms_b1": lat} for name, (_, _, lat) in accuracy.items()})


GATE = GateParams(min_accuracy=0.9, baseline_margin=0.0, max_accuracy_drop=0.01,
                  policy="smallest")
BASELINES = {"baseline_majority": {"accuracy": 0.1}, "baseline_logreg": {"accuracy": 0.95}}


def test_gate_policies():
    r, servable, latency = results(float_torch=(0.98, 100, 1.0), float_onnx=(0.98, 100, 0.2),
                                   int8_onnx=(0.975, 30, 0.3), pruned_onnx=(0.96, 50, 0.1))
    selected, why_not = gate(r, servable, GATE, latency, BASELINES)
    assert selected == "int8_onnx"
    assert r["pruned_onnx"]["eligible"] is False and r["float_torch"]["eligible"] is False
    assert why_not["pruned_onnx"] == ("accuracy 0.9600 below 0.9700 = float_torch 0.9800 - "
                                      "gate.max_accuracy_drop 0.01")
    assert gate(r, servable, GateParams(**{**GATE.__dict__, "policy": "most_accurate"}),
                latency, BASELINES)[0] == "float_onnx"
    assert gate(r, servable, GateParams(**{**GATE.__dict__, "policy": "fastest"}),
                latency, BASELINES)[0] == "float_onnx"
    assert gate(r, servable, GateParams(**{**GATE.__dict__, "min_accuracy": 0.99}),
                latency, BASELINES)[1]["float_onnx"] == (
                    "accuracy 0.9800 below 0.9900 = gate.min_accuracy 0.99")


def test_the_default_gate_is_relative_to_the_best_baseline():
    """gate.min_accuracy null: the bar is the best baseline plus gate.baseline_margin, for every
    modality; a refusal names the key that set the bar."""
    g = GateParams(min_accuracy=None, baseline_margin=0.01, max_accuracy_drop=0.05,
                   policy="smallest")
    r, servable, latency = results(float_torch=(0.955, 100, 1.0), float_onnx=(0.955, 100, 0.2),
                                   int8_onnx=(0.955, 30, 0.3), pruned_onnx=(0.95, 50, 0.1))
    assert gate(r, servable, g, latency, {"baseline_logreg": {"accuracy": 0.6}})[0] == "int8_onnx"
    selected, why_not = gate(r, servable, g, latency, {"baseline_tfidf_lr": {"accuracy": 0.95}})
    assert selected is None
    assert why_not["int8_onnx"] == ("accuracy 0.9550 below 0.9600 = baseline_tfidf_lr 0.9500 + "
                                    "gate.baseline_margin 0.01")
    message = refusal(r, {"baseline_tfidf_lr": {"accuracy": 0.95}}, g)
    assert "needs accuracy >= 0.9600" in message and "(params.yaml gate.baseline_margin)" in message


def test_a_servable_baseline_is_selected_only_when_it_beats_every_variant():
    r, servable, latency = results(float_torch=(0.47, 900, 1.0), float_onnx=(0.47, 900, 0.2),
                                   int8_onnx=(0.46, 300, 0.3), pruned_onnx=(0.45, 500, 0.1),
                                   baseline_tfidf_lr=(0.98, 400, 0.1))
    baselines = {"baseline_majority": {"accuracy": 0.17}, "baseline_tfidf_lr": {"accuracy": 0.98}}
    assert gate(r, servable, GATE, latency, baselines)[0] == "baseline_tfidf_lr"
    # A variant as accurate as the baseline passes the gate (margin 0); the baseline does not.
    r["float_onnx"]["accuracy"] = r["float_torch"]["accuracy"] = 0.98
    selected, why_not = gate(r, servable, GATE, latency, baselines)
    assert selected == "float_onnx"
    assert why_not["baseline_tfidf_lr"].startswith(
        "a baseline serves only when more accurate than every variant (float_torch 0.9800)")
