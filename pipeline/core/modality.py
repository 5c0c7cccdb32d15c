"""The modality seam: what differs between images, texts and audio, behind one interface per
stage.

data.modality in params.yaml names a modality, and a model card names its own
(recipe.data.modality). A modality is a package pipeline/modalities/<name>/ holding one module per part
below, each providing the functions its Protocol lists; the stages keep their steps and call
`part(name, "<part>")` where the data differ. No stage branches on a modality's name, and none
imports a modality's modules directly.

    part      Protocol  called by                          provides
    sources   Sources   ingest                             the source read into the ingested
                                                           layout
    checks    Checks    validate                           the per-item table, its own checks
                                                           (pipeline/core/checks.py registry),
                                                           the data profile and drift, metrics
    augment   Augment   augment, train, compress           the preprocessing record, and how
                                                           training sees the items (views)
    models    Models    train, compress, pipeline.core.saved_model   the model registry, the training
                                                           recipe and tensors, a saved model
                                                           rebuilt
    export    Export    compress                           ONNX export, the MAC example, what
                                                           int8 quantises
    scoring   Scoring   evaluate                           the baselines the gate measures
                                                           against, scored on the test stream
    infra     Infra     package, through pipeline/         each served protocol's requests:
                        serving/protocols.py               the REST answers, gRPC requests
    serving   Serving   service.py, oip.py, evaluate,      its endpoints' input checks, the
                        package                            model input of a batch of items
                                                           (light: no torch)

    preprocess Preprocess every stage, the service            the preprocessing record (RECORD):
                                                           how one item becomes model input,
                                                           saved in every model card; its
                                                           load(bytes) reads an ingested item
                                                           (pipeline/core/dataset.py split_of)

    config    (params)  pipeline/params.py                 its params.yaml section, typed
                                                           (Section; Recipe: what a card
                                                           records) and range-checked (checks);
                                                           its train section holds model,
                                                           max_epochs, lr and batch_size

Adding a modality: write pipeline/modalities/<name>/ with these parts and their tests (a folder
with a config.py is registered: data.modality accepts its name); if its items come to
endpoints of their own, declare them in pipeline/serving/service.py (without, gRPC ModelInfer
serves them). tests/test_modalities.py runs the seven stages for every modality and a toy,
tests/modality_points/, added so;
tests/test_modality.py checks that every registered modality provides every part's functions
with the Protocol's parameters.

`part` imports by name at run time, so pipeline/core/import_closure.py reads a `part(..., "<part>")` call as
an import of pipeline/modalities/<name>/<part>.py of every registered modality: a stage's dvc.yaml deps and
its checkpoint fingerprint cover the parts it can call, and no other modality code.
"""
from __future__ import annotations

import dataclasses
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from pipeline.modalities import part

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch
    from torch import nn

    from pipeline.core.card import ModelCard
    from pipeline.modalities import Budget
    from pipeline.params import Params, TrainParams

AnyPreprocessing = typing.Any  # an instance of a modality's preprocess.RECORD
# A pipeline/core/registry.py Registry, named without importing it: the service imports this module.
AnyRegistry = typing.Any


def preprocessing(modality: str) -> type:
    """The preprocessing record of a registered modality: the class a model card's
    `preprocessing` holds, with its UNIT ("images": what counts and messages call the items) and
    MODEL_FILES (files a model folder holds beside the weights)."""
    return part(modality, "preprocess").RECORD


def card_part(card: ModelCard, name: str) -> ModuleType:
    """The part `name` of a saved model's modality."""
    return part(card.recipe.data.modality, name)


def copy_model_files(card: ModelCard, source: Path, target: Path) -> None:
    """Copy the files a model needs beside its weights (its preprocessing record's MODEL_FILES,
    a text model's tokenizer.json) from one model folder to the next."""
    for file in card.preprocessing.MODEL_FILES:
        shutil.copyfile(Path(source) / file, Path(target) / file)


# --- ingest and validate ---------------------------------------------------------------------

# Names for the Protocols' annotations. This module imports no pandas nor pipeline/core/drift.py: the
# service imports it, and pipeline/core/import_closure.py counts every import, also one for type checking.
Table = typing.Any   # a pandas.DataFrame, one row per item
Drift = typing.Any   # pipeline/core/drift.py's DriftReport, or an object with its table() and metrics()
Baseline = typing.Any  # pipeline/core/baselines.py's Baseline (scikit-learn: not for the service)
ShardWriter = typing.Any  # pipeline/core/dataset.py's ShardWriter (pyarrow: not for the service)


class Preprocess(Protocol):
    """pipeline/modalities/<modality>/preprocess.py: light (numpy, Pillow, tokenizers, soundfile;
    no torch), as the service uses it."""

    RECORD: type  # a frozen dataclass: a card's `preprocessing`, with UNIT, MODEL_FILES and
                  # load(path): one ingested item as the model reads it


class Sources(Protocol):
    """pipeline/modalities/<modality>/sources.py, called by the ingest stage."""


    def source(self, params: Params) -> str:
        """The source params names (image.ingest.source's value, ...), for the stage's summary line."""

    def ingest(self, params: Params, out: ShardWriter) -> list[str]:
        """Add every item of the source to `out` (pipeline/core/dataset.py ShardWriter.add: id,
        label, split, source, bytes); return the class names (also of classes without items)."""


class Checks(Protocol):
    """pipeline/modalities/<modality>/checks.py, called by the validate stage a shard at a time.
    A shard's table has the columns path, source, label, split, file_problem, decode_error,
    content_hash and alike (bool: the rows compared for copies), which the stage's shared checks
    and offender words read, and what its own checks need. Of every item the stage keeps label,
    split, MERGED and FLAGS (the data_set table: pipeline/stages/validate.py). The drift
    metrics' `notes`, if any, are sentences validate and the flow's run summary print."""

    SAME: str                  # what makes two items the same (content_hash), in words
    CHECKS: typing.Iterable    # its own checks (pipeline/core/checks.py Checks)
    SUMMARY: tuple[str, ...]   # the keys of validate's --metrics JSON
    METRICS: tuple[str, ...]   # every key of validate's details JSON, in order
    MERGED: tuple[str, ...]    # the columns its metrics, profile and data-set checks read
    FLAGS: tuple[str, ...]     # bool columns whose True rows its data-set checks name

    def shard_table(self, shard: Path, params: Params) -> tuple[Table, object]:
        """(Item table of one shard file: pipeline/core/dataset.py described_table, row flags
        included; what its profile needs besides the table, or None)."""

    def conclude(self, table: Table, extras: list, params: Params, reference: dict | None
                 ) -> tuple[dict, Drift | None]:
        """(Profile of the data_set table's train split, with every shard's extra; drift from
        `reference` or None)."""

    def metrics(self, table: Table, params: Params) -> dict:
        """The metrics the modality adds to the shared counts (keys of METRICS), of the
        data_set table."""

    def lines(self, metrics: dict, params: Params) -> list[str]:
        """Lines the stage prints after its summary (without the 'validate: ' prefix)."""


# --- augment, train and compress -------------------------------------------------------------
# Training reads the ingested train split through pipeline/core/stream.py, which asks the
# modality's Augmenter (its augment part's augmenter()) to decode items and make their views.


@dataclass(frozen=True)
class FitRecipe:
    """What training follows: params.yaml train (every modality's) and what the modality's
    models part adds (its Models.recipe): the budget, peak lr and batch size of its own train
    section, and whether its tensors take channels_last and CUDA graphs."""
    optimizer: str
    momentum: float
    weight_decay: float
    patience: int
    monitor: str
    seed: int
    lr_schedule: str
    label_smoothing: float
    compile: bool
    processes: int
    shuffle_bytes: int
    max_epochs: int
    lr: float
    batch_size: int
    channels_last: bool
    cuda_graph: bool


def fit_recipe(train: TrainParams, own: Budget, channels_last: bool, cuda_graph: bool
               ) -> FitRecipe:
    """params.yaml train with the modality's train section's budget (`own`) and whether its
    tensors take channels_last and CUDA graphs."""
    return FitRecipe(**dataclasses.asdict(train), max_epochs=own.max_epochs, lr=own.lr,
                     batch_size=own.batch_size, channels_last=channels_last,
                     cuda_graph=cuda_graph)


class Augmenter(Protocol):
    """How training sees the items (pipeline/core/stream.py): decoded to fixed-shape arrays, each
    seen `views` times an epoch (itself, and augmented views drawn per item), made model input a
    batch at a time. Its draws come from pipeline/core/stream.py item_draws or item_rng with the
    salt (its seed, epoch, view), so a view depends on the item's key and nothing else."""

    views: int  # times each training item is seen per epoch: 1 + the modality's copies

    def decode(self, data: list[bytes]) -> np.ndarray:
        """Stored items (their bytes as ingested) -> one compact array (N, ...): uint8 pixels,
        float32 waveforms, int64 token ids."""

    def view(self, items: torch.Tensor, keys: np.ndarray, epoch: int, view: int
             ) -> torch.Tensor:
        """View `view` (0..views-1) in `epoch` of decoded `items` (on their device), as they
        are (dtype and shape); `keys` their pipeline/core/stream.py item_keys."""

    def to_input(self, items: torch.Tensor) -> torch.Tensor:
        """A batch of decoded (or viewed) items as model input, on their device."""


class Augment(Protocol):
    """pipeline/modalities/<modality>/augment.py, called by the augment stage (its preprocessing
    record), and by train and compress (its augmenter)."""

    def write_augmented(self, data: Path, out: Path, params: Params) -> str:
        """The preprocessing record of the ingested train split of `data` (out/preprocessing.json)
        and its MODEL_FILES (e.g. tokenizer.json), the split read a batch at a time; the summary
        line."""

    def augmenter(self, params: Params, prep: AnyPreprocessing, folder: Path) -> Augmenter:
        """The Augmenter params' augment section describes, for a model with preprocessing
        `prep`; `folder` holds prep's MODEL_FILES (data/augmented, or a model folder)."""


class Models(Protocol):
    """pipeline/modalities/<modality>/models.py: the model registry and the training side of a modality,
    called by train, compress (fine-tuning) and pipeline.core.saved_model.load. Every model takes the
    modality's one input tensor and returns logits (N, classes)."""

    MODELS: AnyRegistry  # the model registry: its key (e.g. "image.train.model") names one of them

    def recipe(self, params: Params) -> FitRecipe:
        """What training follows: pipeline/core/training.py fit_recipe of params.yaml train and
        the modality's own max_epochs, lr, batch_size, channels_last and cuda_graph."""

    def torch_threads(self, params: Params) -> int | None:
        """torch's intra-op threads for training and fine-tuning; None keeps torch's default."""

    def create(self, params: Params, prep: AnyPreprocessing, classes: int) -> nn.Module:
        """The model params name, untrained (or as its pretrained checkpoint has it)."""

    def architecture(self, params: Params) -> str:
        """The card's architecture for the model params name: a name rebuild() understands."""

    def model_files(self, model: nn.Module) -> dict[str, bytes]:
        """Files (name -> bytes) beside a trained model's weights, other than its MODEL_FILES."""

    def rebuild(self, card: ModelCard, model_dir: Path) -> nn.Module:
        """The architecture of the saved model in model_dir, with untrained weights."""


class Export(Protocol):
    """pipeline/modalities/<modality>/export.py, called by the compress stage."""

    INPUT: str  # the ONNX graph's one input (its one output is "logits")

    def export_onnx(self, model: nn.Module, prep: AnyPreprocessing, path: Path) -> None:
        """`model` as one ONNX file at `path`: input INPUT with a dynamic batch, output logits."""

    def mac_example(self, prep: AnyPreprocessing) -> tuple[torch.Tensor, str]:
        """The one input MACs are counted on, and what it is in words ("one image")."""

    def int8_scope(self, prepared: Path, folder: Path) -> tuple[Path, dict]:
        """The graph static int8 quantises (from ORT's pre-processed `prepared`; new files go into
        `folder`) and quantize_static's keyword arguments saying which ops."""


# --- evaluate, package and serving -----------------------------------------------------------
if TYPE_CHECKING:
    from typing import Any

    import httpx
    from open_inference.grpc import protocol as pb

    from pipeline.core.card import BentoArgs

    Items = Any  # a split's or a request's items as read: uint8 pixels (N, C, S, S), texts
    SplitItems = Any  # a split as a stream of batches: pipeline/core/dataset.py Items


class Scoring(Protocol):
    """pipeline/modalities/<modality>/scoring.py: the baselines evaluate's gate measures a model
    against. The split itself is the stream of pipeline/core/dataset.py split_of (the items as
    the card's preprocessing reads them), turned into model input by the serving part's
    model_input, as the server does."""

    def baselines(self, data: Path, test: SplitItems, card: ModelCard, params: Params
                  ) -> dict[str, Baseline]:
        """Name -> each baseline (pipeline/core/baselines.py) fitted on data's train split (at most
        evaluate.baseline_train_items items, drawn with data.seed), scored on the split `test`
        (a batch at a time: baselines.streamed), with an `export` where it can be served with
        the card's preprocessing (the serving part's model_input reads a request for a card
        whose architecture is a servable baseline's name)."""


class Infra(Protocol):
    """pipeline/modalities/<modality>/infra.py: the package stage's infra validation of a served Bento.
    Each function makes one protocol's requests for the modality's items, and the protocol's
    entry in pipeline/serving/protocols.py PROTOCOLS calls it; a new protocol whose requests
    depend on the modality adds its function here and to every modality's infra part."""


    def served(self, client: httpx.Client, files: list[bytes], rows: list[dict], items: Items,
               max_batch: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
        """Endpoint -> (indices, answers) of the test items sent (their files as ingested, their
        rows: id, label, split, source; the items decoded) through REST."""

    def infer_request(self, model: str, version: str, items: Items) -> pb.ModelInferRequest:
        """A client's gRPC ModelInfer request for a batch of items."""


class Serving(Protocol):
    """pipeline/modalities/<modality>/serving.py: what the service and gRPC do with a request's items.
    Besides these, it holds the checks of its own REST endpoints, which pipeline/serving/service.py
    declares and calls (an image model's image, images, array; a text model's text, texts),
    each raising ValueError naming the field and the cause. Light: the Bento has no torch."""

    TAKES: str  # what a request to another modality's endpoint is told: the endpoints it takes

    def model_input(self, folder: Path, card: ModelCard) -> Callable[[Items], np.ndarray]:
        """Checked items -> the model's input, by the card's preprocessing and folder's files."""

    def example(self, card: ModelCard) -> Items:
        """One valid item as a checked batch: the service's self-check before /readyz."""

    def api_fields(self, card: ModelCard, args: BentoArgs) -> dict[str, dict]:
        """JSON field of this modality's JSON endpoints -> its JSON schema on the API page
        (/docs.json): every constraint OpenAPI can state (sizes, ranges) and an example that
        the server answers with 200."""

    def grpc_input(self, request: pb.ModelInferRequest, card: ModelCard,
                   args: BentoArgs) -> Items:
        """A ModelInfer request's input tensor as a checked batch."""

    def grpc_metadata(self, card: ModelCard) -> tuple[str, list[str], list[list[int]]]:
        """ModelMetadata's input tensor: its name, accepted datatypes and accepted shapes."""


PARTS = {"preprocess": Preprocess, "sources": Sources, "checks": Checks, "augment": Augment, "models": Models,
         "export": Export, "scoring": Scoring, "infra": Infra, "serving": Serving}
