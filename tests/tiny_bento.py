"""A tiny image model to package and serve, its data, and the package stage run on it as
dvc.yaml runs it: what the serving, promotion and offline tests build their Bentos from."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from pipeline.core.card import ModelCard, Recipe, Selection, ValScore, sha256_file, write_card
from pipeline.core.dataset import write_items
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.params import load_params, recipe_section

REPO = Path(__file__).resolve().parent.parent
SIZE = 8  # px, side of the tiny model's grayscale input
CLASSES = ["bright", "dark", "left"]
PREPROCESSING = Preprocessing(image_size=SIZE, channels=1, mean=[0.5], std=[0.25])


def class_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 8, 8) images of three easily told apart kinds, and their class indices."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 40, (n, SIZE, SIZE))  # dark background
    images[labels == 0] += 200                     # bright all over
    images[labels == 2, :, : SIZE // 2] += 200     # left half bright
    return images.astype(np.uint8), labels


def fit_and_export(net, x, y, steps: int, lr: float, path: Path, input_name: str,
                   dynamic: dict | None = None) -> None:
    """`steps` full-batch Adam steps of `net` on (x, y), then `net` as an ONNX file at `path`
    with input `input_name` (dynamic batch, plus `dynamic` axes) and output logits: a tiny model
    to serve, made as evaluate's variants are."""
    import torch

    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    net.eval()
    torch.onnx.export(net, (x[:2],), str(path), input_names=[input_name], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch"), **(dynamic or {})},),
                      external_data=False)


def write_tiny_model(folder: Path, steps: int = 150, seed: int = 0) -> None:
    """Train a tiny CNN on class_images for `steps` Adam steps (0: an untrained, poor model) and
    write model.onnx + its card as evaluate does."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16, len(CLASSES)))
    images, labels = class_images(96, seed=0)
    x = torch.from_numpy(PREPROCESSING.normalize(images[:, None]))
    folder.mkdir(parents=True)
    fit_and_export(net, x, torch.from_numpy(labels), steps, 0.05, folder / "model.onnx", "input")
    params = load_params(REPO / "params.yaml")
    write_card(folder, ModelCard(
        architecture="tiny_cnn", classes=CLASSES, preprocessing=PREPROCESSING, data_hash="0" * 64,
        recipe=Recipe(data=params.data, train=params.train, compress=params.compress,
                      section=recipe_section(params, "image")),
        weights={"model.onnx": sha256_file(folder / "model.onnx")},
        val=ValScore(loss=0.1, accuracy=1.0),
        selection=Selection(variant="float_onnx", accuracy=1.0, macro_f1=1.0, size_bytes=7000,
                            macs=1000, params=100)))


def write_ingested(folder: Path, n: int, seed: int) -> None:
    """An ingested folder as the ingest stage writes it, with a test split of n class_images."""
    images, labels = class_images(n, seed)
    write_items(folder, (({"id": f"images/test/{CLASSES[label]}/{i:04d}.png",
                           "label": CLASSES[label], "split": "test"}, encode(image, "PNG"))
                         for i, (image, label) in enumerate(zip(images, labels))), CLASSES)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def local_probabilities(model_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """What the server should answer: the same ONNX file and preprocessing, run here."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": PREPROCESSING.normalize(pixels)})[0].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def encode(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format=image_format)
    return buffer.getvalue()


def stage_env(bentoml_home: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}


def run_package(model_dir: Path, ingested: Path, home: Path,
                bentofile: Path = REPO / "bentofile.yaml",
                workspace: Path | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
    """The package stage as dvc.yaml runs it (the real params.yaml), into the BentoML home
    `home`; its report beside model_dir, the champion record and the exported Bentos in
    `workspace` (model_dir's folder by default) as champion.json and champion/. Returns the
    finished process and the report."""
    workspace = workspace or model_dir.parent
    out = model_dir.with_suffix(".package.json")
    reference = ingested / "profile.json"  # stored with the model; only validate reads it
    if not reference.exists():
        reference.write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.stages", "package", "--model", str(model_dir),
         "--bentofile", str(bentofile), "--data", str(ingested), "--reference", str(reference),
         "--champion", str(workspace / "champion.json"), "--export", str(workspace / "champion"),
         "--out", str(out)],
        cwd=REPO, env=stage_env(home), capture_output=True, text=True, timeout=180)
    return done, json.loads(out.read_text()) if out.exists() and done.returncode == 0 else None


def exported(workspace: Path, bento_tag: str) -> Path:
    """The exported Bento folder of `bento_tag` among a run_package workspace's exports."""
    return workspace / "champion" / bento_tag.replace(":", "-")
