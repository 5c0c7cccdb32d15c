"""The modality seam: what differs between images and texts, behind one interface per stage.

data.modality in params.yaml names a modality, and a model card names its own
(recipe.data.modality). A modality is a package pipeline/<name>/ holding one module per part
below, each providing the functions its Protocol lists; the stages keep their steps and call
`part(name, "<part>")` where the data differ. No stage branches on a modality's name, and none
imports a modality's modules directly.

    part        called by                          provides
    scoring     evaluate, package                  Scoring: a split as model input, baselines, floor
    infra       package                            Infra: the served answers, gRPC requests
    serving     service.py, oip.py                 Serving: every endpoint's input, model input
    (sections below, one per part, list the Protocols)

Adding a modality: write pipeline/<name>/ with these parts and their tests, add its name to
pipeline/params.py MODALITIES (data.modality accepts those) and its preprocessing record to
PREPROCESSING below.

`part` imports by name at run time, so pipeline/sources.py reads a `part(..., "<part>")` call as
an import of pipeline/<name>/<part>.py of every registered modality: a stage's dvc.yaml deps and
its checkpoint fingerprint cover the parts it can call, and no other modality code.
"""
from __future__ import annotations

import importlib
import shutil
import typing
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from pipeline.image.preprocess import Preprocessing
from pipeline.params import MODALITIES
from pipeline.text.tokens import TextPreprocessing

if TYPE_CHECKING:
    from pipeline.card import ModelCard

# The record a model card's `preprocessing` holds, per modality: how an item becomes model input.
PREPROCESSING = {"image": Preprocessing, "text": TextPreprocessing}
AnyPreprocessing = typing.Union[tuple(PREPROCESSING.values())]  # what a card may hold


def part(modality: str, name: str) -> ModuleType:
    """pipeline/<modality>/<name>.py: the part `name` of a registered modality."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (registered: {', '.join(MODALITIES)})")
    return importlib.import_module(f"pipeline.{modality}.{name}")


def card_part(card: ModelCard, name: str) -> ModuleType:
    """The part `name` of a saved model's modality."""
    return part(card.recipe.data.modality, name)


def copy_model_files(card: ModelCard, source: Path, target: Path) -> None:
    """Copy the files a model needs beside its weights (its preprocessing record's MODEL_FILES,
    a text model's tokenizer.json) from one model folder to the next."""
    for file in card.preprocessing.MODEL_FILES:
        shutil.copyfile(Path(source) / file, Path(target) / file)


# --- ingest and validate ---------------------------------------------------------------------


# --- augment, train and compress -------------------------------------------------------------


# --- evaluate, package and serving -----------------------------------------------------------
if TYPE_CHECKING:
    from typing import Any, Callable

    import httpx
    import numpy as np
    from open_inference.grpc import protocol as pb
    from PIL import Image

    from pipeline.params import Params, ServeParams

    Items = Any  # a split's or a request's items as read: uint8 pixels (N, C, S, S), texts


class Scoring(Protocol):
    """pipeline/<modality>/scoring.py: the evaluate and package stages score a split with it."""

    def split_input(self, data: Path, split: str, model_dir: Path, card: ModelCard
                    ) -> tuple[np.ndarray, np.ndarray, Items]:
        """(model input, int64 labels (N,), the items as read) of one split of ingested `data`."""

    def baselines(self, data: Path, items: Items, labels: np.ndarray) -> dict[str, dict]:
        """Name -> accuracy, macro_f1, setup of each baseline fitted on data's train split."""

    def floor(self, params: Params) -> tuple[float, str]:
        """The gate's absolute accuracy floor for this modality, and the params key it is."""


class Infra(Protocol):
    """pipeline/<modality>/infra.py: the package stage's infra validation of a served Bento."""

    ITEMS: str  # what a split's items are called in messages ("images")

    def served(self, client: httpx.Client, data: Path, rows: list[dict], items: Items,
               max_batch: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
        """Endpoint -> (indices, answers) of the test items (manifest rows) through REST."""

    def infer_request(self, model: str, version: str, items: Items) -> pb.ModelInferRequest:
        """A client's gRPC ModelInfer request for a batch of items."""


class Serving(Protocol):
    """pipeline/<modality>/serving.py: what the service and gRPC do with a request's items.
    Every endpoint's check exists in every modality: one of another modality raises ValueError
    saying which endpoints the served model takes. Light: the Bento has no torch."""

    def model_input(self, folder: Path, card: ModelCard) -> Callable[[Items], np.ndarray]:
        """Checked items -> the model's input, by the card's preprocessing and folder's files."""

    def example(self, card: ModelCard) -> Items:
        """One valid item as a checked batch: the service's self-check before /readyz."""

    def api_examples(self, card: ModelCard) -> dict[str, object]:
        """JSON field -> the API page's example value, for this modality's JSON endpoints."""

    def image(self, upload: Any, card: ModelCard, serve: ServeParams) -> Image.Image:
        """/classify's field "image": header read and size checked, not yet decoded."""

    def image_head(self, head: bytes, card: ModelCard, serve: ServeParams) -> str | None:
        """Why an upload to /classify is refused from its first bytes, or None."""

    def image_pixels(self, image: Image.Image, card: ModelCard) -> Items:
        """/classify's checked image, decoded, as a checked batch of one."""

    def images(self, images: np.ndarray, card: ModelCard, serve: ServeParams) -> Items:
        """/classify_batch's field "images" as a checked batch."""

    def array(self, data: bytes, card: ModelCard, serve: ServeParams) -> Items:
        """/classify_npy's file "array" (a .npy file's bytes) as a checked batch."""

    def array_head(self, head: bytes, card: ModelCard, serve: ServeParams) -> str | None:
        """Why an upload to /classify_npy is refused from its first bytes, or None."""

    def text(self, text: str, card: ModelCard, serve: ServeParams) -> str:
        """/classify_text's field "text", checked."""

    def texts(self, texts: list[str], card: ModelCard, serve: ServeParams) -> Items:
        """/classify_text_batch's field "texts" as a checked batch."""

    def grpc_input(self, request: pb.ModelInferRequest, card: ModelCard,
                   serve: ServeParams) -> Items:
        """A ModelInfer request's input tensor as a checked batch."""

    def grpc_metadata(self, card: ModelCard) -> tuple[str, list[str], list[list[int]]]:
        """ModelMetadata's input tensor: its name, accepted datatypes and accepted shapes."""
