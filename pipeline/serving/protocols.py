"""The protocols a Kiln Bento serves, as clients: PROTOCOLS has one entry per protocol, and the
package stage's infra validation sends the test split through every entry
(pipeline/lifecycle/infra_validation.py infra_validate), so adding a protocol to the service and to infra
validation touches this file (and, where its requests depend on the model's modality, the
modalities' infra parts, pipeline/modalities/<modality>/infra.py), and no stage.

    rest   the served model's REST endpoints, as its infra part's `served` sends the items (an
           image model's /classify and /classify_npy, a text model's /classify_text_batch and
           /classify_text, an audio model's /classify_audio)
    grpc   gRPC ModelInfer (the Open Inference Protocol, pipeline/serving/oip.py), the items in
           batches of up to serve.max_batch_items, fewer where a request would pass
           serve.max_request_bytes, each request made by the infra part's `infer_request`

Each entry takes the served Bento (Bento), the model's card and the test split (Split) and
returns endpoint -> (indices of the items sent there, their served class probabilities (N, K)
in the card's class order), endpoints in the order they were used: the stage names them so in
its report line ("12 test images through /classify, /classify_npy, gRPC ModelInfer"). An
endpoint that does not answer raises StageError naming it.

This file sits beside the servers it talks to (pipeline/serving/service.py's REST endpoints,
oip.py's gRPC), where a new protocol's server goes too, but it is client code that the Bento does
not ship: pipeline/serving/service.py does not import it, so bentofile.yaml `include` (the
service's import closure: tests/test_deps.py) leaves it out, and with it the infra parts it calls
(httpx requests, a gRPC client channel) and the Bento's sources and tag stay what they were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import grpc
import httpx
import numpy as np
from open_inference.grpc.service import GRPCInferenceServiceStub

from pipeline import StageError
from pipeline.core.card import BentoArgs, ModelCard
from pipeline.core.modality import card_part
from pipeline.serving import oip


@dataclass(frozen=True)
class Bento:
    """A served Bento as its clients reach it."""
    http: httpx.Client  # its HTTP API (base_url on 127.0.0.1: pipeline/lifecycle/local_server.py)
    grpc_port: int      # its gRPC port on 127.0.0.1
    args: BentoArgs     # what it was built with: the model's full tag and params.yaml serve


@dataclass(frozen=True)
class Split:
    """The test items sent: their rows (id, label, split, source), their files (the bytes as
    ingested) and the items as the card's preprocessing reads them (pipeline/core/dataset.py
    split_of), in the same order."""
    rows: list[dict]
    files: list[bytes]
    items: object


Answers = dict[str, tuple[np.ndarray, np.ndarray]]  # endpoint -> (indices, probabilities (N, K))


def rest(bento: Bento, card: ModelCard, split: Split) -> Answers:
    """The model's REST endpoints, as its infra part sends the items to them; each answer's
    probabilities in the card's class order."""
    answers = card_part(card, "infra").served(bento.http, split.files, split.rows, split.items,
                                              bento.args.serve.max_batch_items)
    return {endpoint: (indices, np.array([[p["probabilities"][c] for c in card.classes]
                                          for p in got]))
            for endpoint, (indices, got) in answers.items()}


def grpc_model_infer(bento: Bento, card: ModelCard, split: Split) -> Answers:
    """ModelInfer over loopback gRPC for the Bento's model by name and version, up to
    serve.max_batch_items items per request (fewer where the request would pass the server's
    serve.max_request_bytes: 240 one-second clips are 15 MB), each request made by the model's
    infra part (infer_request)."""
    request_of = card_part(card, "infra").infer_request
    name, version = bento.args.model_tag.split(":")
    max_batch, max_bytes = bento.args.serve.max_batch_items, bento.args.serve.max_request_bytes
    items, served = split.items, []
    with grpc.insecure_channel(f"127.0.0.1:{bento.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        start = 0
        while start < len(items):
            n = min(max_batch, len(items) - start)
            request = request_of(name, version, items[start:start + n])
            while request.ByteSize() > max_bytes and n > 1:
                n //= 2
                request = request_of(name, version, items[start:start + n])
            start += n
            try:
                served.append(oip.probabilities_of(stub.ModelInfer(request, timeout=30)))
            except grpc.RpcError as e:
                raise StageError(f"gRPC ModelInfer on port {bento.grpc_port} answered "
                                 f"{e.code().name}: {e.details()}") from None
    return {"gRPC ModelInfer": (np.arange(len(split.rows)),
                                np.concatenate(served).astype(np.float64))}


PROTOCOLS: dict[str, Callable[[Bento, ModelCard, Split], Answers]] = {
    "rest": rest, "grpc": grpc_model_infer}
