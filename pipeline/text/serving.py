"""The text modality's serving part (pipeline/modality.py Serving): what pipeline/service.py and
pipeline/oip.py do with a text model's requests. A text is checked (a non-space character, at
most serve.max_text_bytes UTF-8 bytes), then tokenized by the model's saved tokenizer
(tokenizer.json, checked against the card's sha256, applied by pipeline/text/tokens.py). A text
is valid Unicode here: pydantic's JSON parser refuses a body that is not UTF-8 or escapes an
unpaired surrogate (HTTP 400), gRPC's BYTES elements are decoded strictly. Endpoints of another
modality answer TAKES (pipeline/service.py).

Bad input raises ValueError naming the field and the cause (HTTP 400, gRPC INVALID_ARGUMENT).
Needs numpy and `tokenizers` only: the Bento has no torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.oip import input_tensor
from pipeline.text import tokens

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.card import ModelCard
    from pipeline.params import ServeParams

SERVES = "a text model"
# What a request to another modality's endpoint is told (after its field's name).
TAKES = (f"this server serves {SERVES}; send {{\"text\": ...}} to /classify_text or "
         "{\"texts\": [...]} to /classify_text_batch")
GRPC_INPUT = "texts"  # ModelInfer's one input tensor, BYTES [N]
EXAMPLE_TEXT = "How are you today?"  # the API page's example: any non-empty text is valid


def model_input(folder: Path, card: ModelCard):
    """Checked texts -> int64 input_ids (N, L) by folder's tokenizer.json (the served TF-IDF
    baseline: the texts themselves, tokens.raw_texts)."""
    if card.architecture == tokens.RAW_TEXT_MODEL:
        return tokens.raw_texts
    tokenizer = tokens.load(folder, card.preprocessing)
    return lambda texts: tokens.encode(tokenizer, texts, card.preprocessing)


def example(card: ModelCard) -> list[str]:
    return [EXAMPLE_TEXT]


def api_examples(card: ModelCard) -> dict[str, object]:
    return {"text": EXAMPLE_TEXT, "texts": [EXAMPLE_TEXT, EXAMPLE_TEXT.lower()]}


def checked_text(text: str, name: str, max_text_bytes: int) -> str:
    """One text, checked before it is tokenized: a non-space character and at most
    max_text_bytes UTF-8 bytes. Raises ValueError naming `name`."""
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        raise ValueError(f"{name}: {size} UTF-8 bytes, over the limit of {max_text_bytes} bytes")
    if not text.strip():
        raise ValueError(f"{name}: {'empty' if not text else 'whitespace only'}; send a text "
                         "with at least one word")
    return text


def text(text: str, card: ModelCard, serve: ServeParams) -> str:
    return checked_text(text, "text", serve.max_text_bytes)


def texts(texts: list[str], card: ModelCard, serve: ServeParams) -> list[str]:
    """1..serve.max_batch_images texts, each checked_text (named texts[i])."""
    if not texts:
        raise ValueError("texts: no texts; send at least one")
    if len(texts) > serve.max_batch_images:
        raise ValueError(f"texts: {len(texts)} texts; at most {serve.max_batch_images} texts "
                         "per request")
    return [checked_text(t, f"texts[{i}]", serve.max_text_bytes) for i, t in enumerate(texts)]


def grpc_input(request, card: ModelCard, serve: ServeParams) -> list[str]:
    """The request's one BYTES input tensor "texts" [N] as N texts, each decoded as UTF-8 and
    checked as `texts` checks HTTP's."""
    tensor, raw = input_tensor(request, GRPC_INPUT, SERVES, " (BYTES [N], UTF-8 texts)")
    if tensor.datatype != "BYTES":
        raise ValueError(f"{GRPC_INPUT}: datatype {tensor.datatype!r} not accepted; send "
                         "UTF-8 texts as BYTES")
    shape = list(tensor.shape)
    if len(shape) != 1 or shape[0] < 0:
        raise ValueError(f"{GRPC_INPUT}: shape {shape}; expected [N], one element per text")
    if raw is not None:
        elements, where = _bytes_elements(raw, shape[0]), "raw_input_contents[0]"
    else:
        elements, where = list(tensor.contents.bytes_contents), "contents.bytes_contents"
    if len(elements) != shape[0]:
        raise ValueError(f"{GRPC_INPUT}: shape {shape}; {where} holds {len(elements)} elements")
    decoded = []
    for i, element in enumerate(elements):
        try:
            decoded.append(element.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{GRPC_INPUT}[{i}]: not valid UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None
    return texts(decoded, card, serve)


def _bytes_elements(data: bytes, expected: int) -> list[bytes]:
    """A BYTES tensor's raw contents -> its elements: each a 4-byte little-endian length, then
    that many bytes (KServe/Triton); read up to one past `expected` (the count its shape says),
    so a message of millions of empty elements is not split whole."""
    elements, at = [], 0
    while at < len(data) and len(elements) <= expected:
        if at + 4 > len(data):
            raise ValueError(f"raw_input_contents[0]: element {len(elements)} has "
                             f"{len(data) - at} bytes of its 4-byte length prefix; BYTES "
                             "elements are a 4-byte little-endian length, then the bytes")
        size = int.from_bytes(data[at:at + 4], "little")
        if at + 4 + size > len(data):
            raise ValueError(f"raw_input_contents[0]: element {len(elements)} says {size} "
                             f"bytes; {len(data) - at - 4} remain")
        elements.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return elements


def grpc_metadata(card: ModelCard) -> tuple[str, list[str], list[list[int]]]:
    return GRPC_INPUT, ["BYTES"], [[-1]]
