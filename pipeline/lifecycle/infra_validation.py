"""Infra validation, for the package stage: the new Bento served on loopback for as long as
the stage lives (pipeline/lifecycle/local_server.py), a seeded sample of the test split
(package.infra_items, drawn with data.seed; the whole split when it is no larger) sent through
every protocol it serves (pipeline/serving/protocols.py PROTOCOLS), and the served classes and
probabilities compared with the evaluated model's, computed here from the same items."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline import StageError
from pipeline.core.card import PREDICT_BATCH, BentoArgs, ModelCard, onnx_predictor, softmax
from pipeline.core.dataset import sample, split_of
from pipeline.core.modality import card_part
from pipeline.lifecycle.local_server import serving
from pipeline.serving.protocols import PROTOCOLS, Bento, Split


def probabilities(model_dir: Path, card: ModelCard, batches: Iterable) -> np.ndarray:
    """The model's class probabilities for the items of `batches`, as the server computes them
    (the serving part's model_input, ONNX Runtime)."""
    (weights,) = card.weights
    predict = onnx_predictor(model_dir / weights, 1)
    model_input = card_part(card, "serving").model_input(model_dir, card)
    return softmax(np.concatenate([predict(model_input(items)) for items in batches]))


def test_accuracy(model_dir: Path, card: ModelCard, data_dir: Path) -> float:
    """The model's accuracy on the test split, read a batch at a time."""
    test = split_of(data_dir, "test", card.preprocessing)
    predicted = probabilities(model_dir, card, (items for items, _ in
                                                test.batches(PREDICT_BATCH)))
    return float((predicted.argmax(1) == test.labels()).mean())


@contextlib.contextmanager
def _named(prefix: str):
    """Prefix the message of a StageError raised inside the block."""
    try:
        yield
    except StageError as e:
        raise StageError(f"{prefix}{e}") from e


def infra_validate(bento_tag: str, args: BentoArgs, model_dir: Path, card: ModelCard,
                   data_dir: Path, ready_timeout_s: float, items: int, seed: int) -> dict:
    """Serve the Bento and check it answers a sample of `items` test items (drawn with `seed`)
    as model_dir's model does here, through every protocol it serves
    (pipeline/serving/protocols.py PROTOCOLS; gRPC asks for args.model_tag by name and
    version). Raises StageError naming the first differences; returns what was checked:
    "tested" (in words) and the endpoints."""
    test = split_of(data_dir, "test", card.preprocessing)
    chosen = sample(len(test), items, seed)
    rows, files, items = test.take(chosen)  # held: they are all sent
    expected = probabilities(model_dir, card, (items[i:i + PREDICT_BATCH]
                                               for i in range(0, len(items), PREDICT_BATCH)))
    split = Split(rows=rows, files=files, items=items)
    served = {}
    with tempfile.TemporaryDirectory() as tmp, \
            _named("infra validation: "), serving(bento_tag, Path(tmp, "serve.log"),
                                                  ready_timeout_s) as client:
        bento = Bento(http=client, grpc_port=client.grpc_port, args=args)
        for answers in PROTOCOLS.values():
            served.update(answers(bento, card, split))
    _compare(bento_tag, rows, expected, served)
    sampled = "" if len(rows) == len(test) else f" of {len(test)}"
    return {"tested": f"{len(rows)}{sampled} test {card.preprocessing.UNIT}",
            "endpoints": list(served)}


def _compare(bento_tag: str, rows: list[dict], expected: np.ndarray,
             served: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Raise StageError naming the first endpoint whose answers for the sent items at `indices`
    differ from `expected` (the evaluated model's, in the order of `rows`) in class or by more
    than 1e-5 in probability."""
    for endpoint, (indices, got) in served.items():
        want = expected[indices]
        wrong = [(rows[i]["source"], int(e), int(a)) for i, e, a in
                 zip(indices, want.argmax(1), got.argmax(1)) if e != a]
        off = float(np.abs(got - want).max()) if got.shape == want.shape else np.inf
        if wrong or off > 1e-5:
            raise StageError(f"infra validation: {endpoint} of {bento_tag} differs from the "
                             f"evaluated model on {len(wrong)} of {len(want)} test items "
                             f"(got {len(got)} answers, probabilities up to {off:.2g} apart); "
                             f"first (source, expected, served): {wrong[:5]}")
