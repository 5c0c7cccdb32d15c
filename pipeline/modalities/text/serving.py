"""The text modality's serving part (pipeline/core/modality.py Serving): what pipeline/serving/service.py and
pipeline/serving/oip.py do with a text model's requests. A text is checked (a visible character, at
most text.serve.max_text_bytes UTF-8 bytes), then tokenized by the model's saved tokenizer
(tokenizer.json, checked against the card's sha256, applied by pipeline/modalities/text/preprocess.py). A text
is valid Unicode here: pydantic's JSON parser refuses a body that is not UTF-8 or escapes an
unpaired surrogate (HTTP 400), gRPC's BYTES elements are decoded strictly. Endpoints of another
modality answer TAKES (pipeline/serving/service.py).

Bad input raises ValueError naming the field and the cause (HTTP 400, gRPC INVALID_ARGUMENT).
The number of texts is checked before any text is read (a gRPC BYTES tensor's elements are not
split until its shape says at most serve.max_batch_items). Needs numpy and `tokenizers` only:
the Bento has no torch.
"""
from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

import numpy as np

from pipeline.serving.oip import input_tensor, shape_of
from pipeline.modalities.text import preprocess as tokens

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.core.card import BentoArgs, ModelCard

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


def api_fields(card: ModelCard, args: BentoArgs) -> dict[str, dict]:
    """"text": a string of 1..text.serve.max_text_bytes characters (OpenAPI counts characters, the
    limit is UTF-8 bytes); "texts": 1..serve.max_batch_items of them."""
    text = {"type": "string", "minLength": 1, "maxLength": args.limits.max_text_bytes}
    return {"text": {**text, "example": EXAMPLE_TEXT},
            "texts": {"type": "array", "minItems": 1, "maxItems": args.serve.max_batch_items,
                      "items": text, "example": [EXAMPLE_TEXT, EXAMPLE_TEXT.lower()]}}


# Hangul fillers: letters (Lo) that draw nothing, Unicode's only default-ignorable code points
# among letters, numbers, punctuation and symbols.
HANGUL_FILLERS = (0x115F, 0x1160, 0x3164, 0xFFA0)
# Code points past plane 3 are unassigned, tags and variation selectors (plane 14) or private use
# (planes 15-16): none is visible.
VISIBLE_BELOW = 0x40000


def _visible_code_points() -> np.ndarray:
    """bool per code point below VISIBLE_BELOW: a letter, number, punctuation mark or symbol
    (Unicode general categories L, N, P, S), which a font draws; not a control, format (zero-width
    space, joiners, bidi marks, BOM), separator, combining mark, surrogate, private-use or
    unassigned code point, nor a Hangul filler. Built in ~0.1 s."""
    category = unicodedata.category
    visible = np.fromiter((category(chr(c))[0] in "LNPS" for c in range(VISIBLE_BELOW)), bool,
                          VISIBLE_BELOW)
    visible[list(HANGUL_FILLERS)] = False
    return visible


VISIBLE = _visible_code_points()


def has_visible_character(text: str) -> bool:
    """Whether `text` holds a character VISIBLE says is drawn; ~85 ms for 2.8 M invisible
    characters (an 8 MB body of zero-width spaces), a table lookup in numpy, not a Python loop."""
    rest = text.lstrip()
    if not rest:
        return False
    if ord(rest[0]) < VISIBLE_BELOW and VISIBLE[ord(rest[0])]:  # nearly every text
        return True
    points = np.frombuffer(rest.encode("utf-32-le", "surrogatepass"), "<u4")
    return bool(VISIBLE[points[points < VISIBLE_BELOW]].any())


def checked_text(text: str, name: str, max_text_bytes: int) -> str:
    """One text, checked before it is tokenized: a visible character (has_visible_character)
    and at most max_text_bytes UTF-8 bytes. Raises ValueError naming `name`. A text of control,
    zero-width or other invisible characters only is refused as an empty one is: the tokenizer
    drops them, and the model would classify nothing (it answered such a text with p=0.87)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_text_bytes:
        raise ValueError(f"{name}: {size} UTF-8 bytes, over the limit of {max_text_bytes} bytes")
    if not has_visible_character(text):
        what = ("empty" if not text else "whitespace only" if text.isspace() else
                "no visible character (only whitespace, control, format or zero-width "
                "characters)")
        raise ValueError(f"{name}: {what}; send a text with at least one word")
    return text


def text(text: str, card: ModelCard, args: BentoArgs) -> str:
    return checked_text(text, "text", args.limits.max_text_bytes)


def _count(count: int, args: BentoArgs) -> None:
    """ValueError unless 1 <= count <= serve.max_batch_items (texts in one request)."""
    if count == 0:
        raise ValueError("texts: no texts; send at least one")
    if count > args.serve.max_batch_items:
        raise ValueError(f"texts: {count} texts; at most {args.serve.max_batch_items} texts per "
                         "request")


def texts(texts: list[str], card: ModelCard, args: BentoArgs) -> list[str]:
    """1..serve.max_batch_items texts, each checked_text (named texts[i])."""
    _count(len(texts), args)
    return [checked_text(t, f"texts[{i}]", args.limits.max_text_bytes) for i, t in enumerate(texts)]


def grpc_input(request, card: ModelCard, args: BentoArgs) -> list[str]:
    """The request's one BYTES input tensor "texts" [N] as N texts, each decoded as UTF-8 and
    checked as `texts` checks HTTP's."""
    tensor, raw = input_tensor(request, GRPC_INPUT, SERVES, " (BYTES [N], UTF-8 texts)")
    if tensor.datatype != "BYTES":
        raise ValueError(f"{GRPC_INPUT}: datatype {tensor.datatype!r} not accepted; send "
                         "UTF-8 texts as BYTES")
    if len(tensor.shape) != 1 or tensor.shape[0] < 0:
        raise ValueError(f"{GRPC_INPUT}: shape {shape_of(tensor)}; expected [N], one element per "
                         "text")
    count = tensor.shape[0]
    _count(count, args)  # before a single element is read
    if raw is not None:
        elements = _bytes_elements(raw, count)
    else:
        held = len(tensor.contents.bytes_contents)
        if held != count:
            raise ValueError(f"{GRPC_INPUT}: shape [{count}]; contents.bytes_contents holds "
                             f"{held} elements")
        elements = list(tensor.contents.bytes_contents)
    decoded = []
    for i, element in enumerate(elements):
        try:
            decoded.append(element.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{GRPC_INPUT}[{i}]: not valid UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None
    return texts(decoded, card, args)


def _bytes_elements(data: bytes, expected: int) -> list[bytes]:
    """A BYTES tensor's raw contents -> its `expected` elements (the count its shape says,
    already checked against the limit): each a 4-byte little-endian length, then that many
    bytes (KServe/Triton). Reads no further than `expected` elements, so a message of millions
    of empty elements is not split whole."""
    elements, at = [], 0
    while len(elements) < expected:
        if at == len(data):
            raise ValueError(f"{GRPC_INPUT}: shape [{expected}]; raw_input_contents[0] holds "
                             f"{len(elements)} elements")
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
    if at < len(data):
        raise ValueError(f"{GRPC_INPUT}: shape [{expected}]; raw_input_contents[0] holds more "
                         f"than {expected} elements ({len(data) - at} bytes after element "
                         f"{expected - 1})")
    return elements


def grpc_metadata(card: ModelCard) -> tuple[str, list[str], list[list[int]]]:
    return GRPC_INPUT, ["BYTES"], [[-1]]
