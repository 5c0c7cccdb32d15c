"""The model card: what travels with a model's weights, as one typed record (model.json), and the
one ONNX Runtime session every reader of an ONNX model uses.

train writes the card next to the float weights; compress next to the ONNX variants (same card,
its own weights and the compress recipe); evaluate next to the selected variant (with the
selection); package stores that card in the BentoML model, where the service reads it. Every
reader checks each weights file against the sha256 the card records, so a corrupt or swapped
file (a damaged DVC cache object restored by `dvc checkout`, say) is refused by name instead of
being loaded.

Imports no torch (onnxruntime only when a session is opened): the Bento's service reads cards
too, and ships without torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline import StageError
from pipeline.params import (CompressParams, DataParams, ParamsError, ServeParams, TrainParams,
                             typed)
from pipeline.core.modality import AnyPreprocessing, part, preprocessing

CARD_FILE = "model.json"
PREDICT_BATCH = 256  # items per batch when a split is scored (bounded memory)


@dataclass(frozen=True)
class Recipe:
    """The params.yaml sections that made the weights, as they were when they were made."""
    data: DataParams
    train: TrainParams
    compress: CompressParams | None  # set from the compress stage on
    # The modality's own (data.modality's section, pipeline/modalities/<name>/config.py Recipe:
    # ingest, preprocess, augment, train), read as a mapping first, then by that schema
    section: Any


@dataclass(frozen=True)
class ValScore:
    """The float model on the val split after the training epoch whose weights were saved (the
    best by train.monitor, pipeline/core/training.py EarlyStopping)."""
    loss: float
    accuracy: float


@dataclass(frozen=True)
class Selection:
    """The variant evaluate's gate selected, measured on the test split."""
    variant: str         # float_onnx | pruned_onnx | int8_onnx, or a servable baseline's name
    accuracy: float
    macro_f1: float
    size_bytes: int
    macs: int            # multiply-accumulates per image (pipeline/stages/compress.py counts them)
    params: int


@dataclass(frozen=True)
class ModelCard:
    architecture: str              # a name in its modality's model registry, or the name of
                                   # the servable baseline it is (pipeline/core/baselines.py)
    classes: list[str]             # a label's index is its position here
    # How an item becomes model input: the preprocess.RECORD of recipe.data.modality
    # (pipeline/core/modality.py), read as a mapping first, then by that record's schema
    preprocessing: AnyPreprocessing
    data_hash: str                 # sha256 of the ingested data set (pipeline.core.dataset.data_hash)
    recipe: Recipe
    weights: dict[str, str]        # weights file next to the card -> sha256 hex of its bytes
    val: ValScore
    selection: Selection | None    # set by evaluate


@dataclass(frozen=True)
class BentoArgs:
    """The Bento's build arguments (bentoml.use_arguments): the exact model it serves, by full
    tag, and the serving settings it was infra-validated with: params.yaml serve and the
    modality's own limits (its serve section, config.Serve: read as a mapping first, then by
    that schema once the model's modality is known, read_limits)."""
    model_tag: str
    serve: ServeParams
    limits: Any


def read_limits(args: BentoArgs, modality: str) -> BentoArgs:
    """`args` with its limits read by `modality`'s schema (ParamsError naming a bad key)."""
    limits = typed(args.limits, part(modality, "config").Serve, "Bento arguments.limits")
    return dataclasses.replace(args, limits=limits)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_dict(record) -> dict:
    """A card (or any of these records) as plain JSON-able data; `typed` reads it back."""
    return dataclasses.asdict(record)


def read_card(folder: Path) -> ModelCard:
    """folder/model.json as a ModelCard, with every weights file it lists checked (verify)."""
    path = Path(folder) / CARD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: model card not found") from None
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None
    try:
        card = typed(_upgrade(raw), ModelCard, "card")
        modality = card.recipe.data.modality  # its preprocessing and section, by its schemas
        section = typed(card.recipe.section, part(modality, "config").Recipe,
                        "card.recipe.section")
        card = dataclasses.replace(
            card, preprocessing=typed(card.preprocessing, preprocessing(modality),
                                      "card.preprocessing"),
            recipe=dataclasses.replace(card.recipe, section=section))
    except ParamsError as e:
        raise StageError(f"{path}: {e}".replace(": card.", ": ", 1)) from None
    verify(folder, card)
    return card


def _upgrade(raw):
    """A card written before data.background existed as one with background None: its model
    was trained with alpha dropped (PIL's convert), and is served the same way. One written
    before data.modality existed is an image model's, without a text (or audio) recipe; one
    before train.cuda_graph was trained without CUDA graphs; one before early stopping trained
    for its `epochs`, all of them (patience = epochs, which the card records as max_epochs), and
    had the gate's floor of its modality in text.min_accuracy or audio.min_accuracy. One written
    before the modality sections of params.yaml is then moved to today's layout (_sectioned).
    An image card from before the warped_digits source records no image.ingest.warped_items
    (None): its source was another. A text card from before the shared ingest columns records
    text.ingest.text_column, label_column and split_column: dropped (ingest.item_column and the
    rest now, not a recipe's). One from before train.shuffle_bytes shuffled its whole training
    set each epoch: 0."""
    try:
        recipe = raw["recipe"]
        recipe["train"].setdefault("shuffle_bytes", 0)
        if "section" in recipe:
            if recipe["data"]["modality"] == "image":
                recipe["section"]["ingest"].setdefault("warped_items", None)
            if recipe["data"]["modality"] == "text":
                for key in ("text_column", "label_column", "split_column"):
                    recipe["section"]["ingest"].pop(key, None)
            return raw
        data = recipe["data"]
        data.setdefault("modality", "image")
        if data["modality"] == "image":
            for section in (raw["preprocessing"], data):
                section.setdefault("background", None)
        recipe.setdefault("text", None)
        recipe.setdefault("audio", None)
        recipe["train"].setdefault("cuda_graph", False)  # cards before train.cuda_graph
        for section in (recipe["train"], recipe["text"], recipe["audio"]):
            if section is not None and "epochs" in section:  # cards before early stopping
                section["max_epochs"] = section.pop("epochs")
                section.pop("min_accuracy", None)
        train = recipe["train"]
        train.setdefault("patience", train["max_epochs"])
        train.setdefault("monitor", "val_loss")
        raw["recipe"] = _sectioned(recipe)
        if data["modality"] == "image":
            raw["recipe"]["section"]["ingest"].setdefault("warped_items", None)
    except (KeyError, TypeError, AttributeError):
        pass  # not a card's shape: typed() names what is wrong
    return raw


def _sectioned(recipe: dict) -> dict:
    """An old card's recipe (data, augment, train and the text or audio section holding every
    key of its modality) in today's layout: the shared sections' keys, and each key of the
    modality's config.Recipe taken from where it was (image: data, augment and train)."""
    data, train, modality = recipe["data"], recipe["train"], recipe["data"]["modality"]
    own = recipe.get(modality) or {}
    flat = {**data, **train, **own}
    hints = typing.get_type_hints(part(modality, "config").Recipe)
    section = {name: {key: flat[key] for key in typing.get_type_hints(kind) if key in flat}
               for name, kind in hints.items()}
    section["augment"] = own["augment"] if "augment" in own else recipe["augment"]
    compress = recipe["compress"]
    if compress is not None and "calibration_images" in compress:
        compress["calibration_items"] = compress.pop("calibration_images")
    return {"data": {key: data[key] for key in typing.get_type_hints(DataParams) if key in data},
            "train": {key: train[key] for key in typing.get_type_hints(TrainParams) if key in train},
            "compress": compress, "section": section}


def write_card(folder: Path, card: ModelCard) -> None:
    (Path(folder) / CARD_FILE).write_text(json.dumps(to_dict(card), indent=1) + "\n",
                                          encoding="utf-8")


def verify(folder: Path, card: ModelCard) -> None:
    """Raise StageError naming the first weights file that is missing or whose bytes differ from
    the sha256 in the card."""
    for name, expected in card.weights.items():
        path = Path(folder) / name
        if not path.is_file():
            raise StageError(f"{path}: weights file missing (listed in {path.parent / CARD_FILE})")
        actual = sha256_file(path)
        if actual != expected:
            raise StageError(f"{path}: sha256 {actual[:16]}... does not match "
                             f"{expected[:16]}... recorded in {path.parent / CARD_FILE}: the "
                             "file is corrupt or was replaced; restore it (`dvc checkout`, or "
                             "rerun the stage that writes it)")


def at_least(accuracy: float, floor: float) -> bool:
    """accuracy >= floor, where both are sums of fractions: a float-rounding hair below counts."""
    return accuracy >= floor - 1e-9


def onnx_predictor(path: Path, threads: int) -> Callable:
    """The model's one input (float32 `input` (N, C, S, S) of an image model, int64 `input_ids`
    (N, L) of a text model) -> float32 logits (N, classes), by an ONNX Runtime CPU
    session on `threads` intra-op threads that sleep when idle. Spinning threads (ORT's default)
    burnt a second core between requests and cut single-image throughput by a fifth on 2 cores
    (docs/benchmarks.md, Serving)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    return lambda x: session.run(["logits"], {model_input.name: x})[0]


def softmax(logits):
    """Logits (N, K) -> float64 class probabilities (N, K): what the server answers, and what
    the package stage checks it against."""
    import numpy as np

    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
