"""The image modality's serving part (pipeline/core/modality.py Serving): what pipeline/serving/service.py
and pipeline/serving/oip.py do with an image model's requests. An upload (PNG, JPEG, WebP, BMP, TIFF or
GIF: pipeline/modalities/image/preprocess.py IMAGE_FORMATS, what validate takes) has its header read and its
size checked before it is decoded, and is refused if it holds several frames or float pixels,
as validate refuses such files; a pixel array's or a .npy file's shape, dtype and values are
checked before anything large is allocated; the checked pixels are normalised by the card's
preprocessing (pipeline/modalities/image/preprocess.py), never re-implemented here. Endpoints of another
modality answer TAKES (pipeline/serving/service.py).

Bad input raises ValueError naming the field and the cause (HTTP 400, gRPC INVALID_ARGUMENT).
Needs numpy and Pillow only: the Bento has no torch.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError

from pipeline.modalities.image.preprocess import ACCEPTED, IMAGE_FORMATS, refusal
from pipeline.serving.oip import input_tensor, shape_of

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.core.card import BentoArgs, ModelCard

SERVES = "an image model"
# What a request to another modality's endpoint is told (after its field's name).
TAKES = f"this server serves {SERVES}; send images to /classify, /classify_batch or /classify_npy"
GRPC_INPUT = "images"  # ModelInfer's one input tensor
# OIP datatype -> (dtype of its raw bytes, typed contents field, dtype the contents are read as:
# uint_contents holds uint32, so a value over 255 is seen and refused instead of wrapping)
DATATYPES = {"UINT8": (np.dtype("<u1"), "uint_contents", np.uint32),
             "FP32": (np.dtype("<f4"), "fp32_contents", np.float32)}


def _input_shape(card: ModelCard) -> tuple[int, int, int]:
    p = card.preprocessing
    return p.channels, p.image_size, p.image_size


def model_input(folder: Path, card: ModelCard):
    """Checked pixels (uint8 or [0, 255] float (N, C, S, S)) -> float32 model input."""
    return card.preprocessing.normalize


def example(card: ModelCard) -> np.ndarray:
    """One blank image."""
    return np.zeros((1, *_input_shape(card)), np.uint8)


def api_fields(card: ModelCard, args: BentoArgs) -> dict[str, dict]:
    """/classify_batch's "images": arrays of 1..serve.max_batch_items images of the model's
    input shape (S x S rows of pixels, or C of those; either for a grayscale model), values
    0..255; the example: one blank image."""
    c, s, _ = _input_shape(card)

    def exactly(n: int, item: dict) -> dict:
        return {"type": "array", "minItems": n, "maxItems": n, "items": item}

    # JSON true and false are pixels 1 and 0, as numpy reads them (`images` takes a bool array)
    pixel = {"anyOf": [{"type": "number", "minimum": 0, "maximum": 255}, {"type": "boolean"}]}
    image = exactly(s, exactly(s, pixel))
    shapes = [image, exactly(c, image)] if c == 1 else [exactly(c, image)]
    batches = [{"type": "array", "minItems": 1, "maxItems": args.serve.max_batch_items,
                "items": shape} for shape in shapes]
    example = np.zeros((1, s, s) if c == 1 else (1, c, s, s), np.uint8).tolist()
    return {"images": {**({"oneOf": batches} if len(batches) > 1 else batches[0]),
                       "example": example}}


def image(upload, card: ModelCard, args: BentoArgs) -> Image.Image:
    """Multipart upload -> a PIL image whose header has been read, whose size is within
    image.serve.max_image_pixels and which is one picture Kiln takes (preprocess.refusal, as validate
    refuses), not yet decoded (the service decides where to decode)."""
    data = upload if isinstance(upload, bytes) else getattr(upload, "file", upload).read()
    try:
        opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        raise ValueError(f"image: not a {ACCEPTED} file") from e
    # A header PIL recognises but cannot parse; DecompressionBombError only if
    # image.serve.max_image_pixels is set above PIL's own limit (2 x Image.MAX_IMAGE_PIXELS).
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image: cannot read the image header ({e})") from e
    try:
        # over the limit first: reading past the header (is_animated seeks to a GIF's second
        # frame) is for images within it
        problem = _pixels_over_limit(opened, args) or _refused(opened)
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a damaged second frame or page
        problem = f"image: cannot read the {opened.format} file ({e})"
    if problem:
        opened.close()
        raise ValueError(problem)
    return opened


def _refused(image: Image.Image) -> str | None:
    refused = refusal(image)
    return f"image: {refused[1]}" if refused else None


def _pixels_over_limit(image: Image.Image, args: BentoArgs) -> str | None:
    width, height = image.size
    if width * height > args.limits.max_image_pixels:
        return (f"image: {width}x{height} = {width * height} pixels, over the limit of "
                f"{args.limits.max_image_pixels} pixels")
    return None


def image_head(head: bytes, card: ModelCard, args: BentoArgs) -> str | None:
    """Why an image whose header shows it over image.serve.max_image_pixels is refused, or None
    (anything else is left to `image`)."""
    try:
        with Image.open(io.BytesIO(head), formats=IMAGE_FORMATS) as opened:
            return _pixels_over_limit(opened, args)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def image_pixels(image: Image.Image, card: ModelCard) -> np.ndarray:
    """Decoded now, so a truncated file fails here (HTTP 400) and not in preprocessing; ->
    uint8 (1, C, S, S) by the card's preprocessing."""
    try:
        image.load()
    # PIL reports a damaged file as OSError ("image file is truncated"), SyntaxError (broken
    # PNG chunks) or ValueError.
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image: cannot decode the {image.format} file ({e})") from e
    with image:
        return card.preprocessing.pixels(image)[None]


def _checked_shape(sent: tuple[int, ...], card: ModelCard, args: BentoArgs) -> tuple[int, ...]:
    """A batch's shape, (N, S, S) (grayscale models) or (N, C, S, S) at the model's input
    size with 1 <= N <= serve.max_batch_items, as (N, C, S, S); ValueError naming "images"
    otherwise. Checked before any pixel is read."""
    c, s, _ = _input_shape(card)
    expected = f"(N, {s}, {s}) or (N, {c}, {s}, {s})" if c == 1 else f"(N, {c}, {s}, {s})"
    shape = (sent[0], 1, *sent[1:]) if len(sent) == 3 and c == 1 else tuple(sent)
    if len(shape) != 4 or shape[1:] != (c, s, s):
        raise ValueError(f"images: expected shape {expected}, got {tuple(sent)}")
    if shape[0] == 0:
        raise ValueError(f"images: empty batch; expected shape {expected} with N >= 1")
    if shape[0] > args.serve.max_batch_items:
        raise ValueError(f"images: {shape[0]} images; at most {args.serve.max_batch_items} "
                         f"images per request")
    return shape


def images(images: np.ndarray, card: ModelCard, args: BentoArgs) -> np.ndarray:
    """Pixel values 0..255 of shape (N, S, S) (grayscale models) or (N, C, S, S) at the model's
    input size, 1 <= N <= serve.max_batch_items -> float32 (N, C, S, S). Checked per request,
    before adaptive batching concatenates requests (a wrong shape there would fail every
    request in the batch)."""
    if images.dtype.kind not in "buif":  # b: JSON true and false, pixels 1 and 0 (api_fields)
        raise ValueError(f"images: expected uint8 or float pixel values 0..255, got dtype {images.dtype}")
    images = images.reshape(_checked_shape(images.shape, card, args))
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 255:
        raise ValueError("images: pixel values must be finite and within 0..255")
    return images.astype(np.float32, copy=False)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """A .npy file's (first) bytes -> (shape, fortran_order, dtype, offset of the values), the
    dtype checked to be numeric."""
    if data[:4] == b"PK\x03\x04":
        raise ValueError("array: a .npz archive; expected one .npy file (numpy.save)")
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        read_header = {(1, 0): npy_format.read_array_header_1_0,
                       (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version} is not supported (1.0, 2.0 are)")
        shape, fortran_order, dtype = read_header(f)
    except (ValueError, OSError, EOFError, SyntaxError) as e:  # not .npy, or a damaged header
        raise ValueError(f"array: not a readable .npy file ({e})") from e
    if dtype.hasobject or dtype.kind not in "uif":
        raise ValueError(f"array: expected uint8 or float pixel values 0..255, got dtype {dtype}")
    return shape, fortran_order, dtype, f.tell()


def _npy_values_over_limit(shape: tuple[int, ...], card: ModelCard,
                           args: BentoArgs) -> str | None:
    c, s, _ = _input_shape(card)
    count = _values(shape)
    if count > args.serve.max_batch_items * c * s * s:
        return (f"array: shape {shape} holds {count} values; at most "
                f"{args.serve.max_batch_items} images per request")
    return None


def _values(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=object))  # Python ints: a hostile shape cannot overflow


def array(data: bytes, card: ModelCard, args: BentoArgs) -> np.ndarray:
    """A .npy file's bytes -> its pixels, checked as `images` checks them (the messages name
    "array"), without copying the file: its header is checked first (a numeric dtype and at
    most serve.max_batch_items images' worth of values, all present in the file), so a header
    claiming billions of values is refused before anything is allocated."""
    shape, fortran_order, dtype, offset = _npy_header(data)
    problem = _npy_values_over_limit(shape, card, args)
    if problem:
        raise ValueError(problem)
    count = _values(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"array: not a readable .npy file (header says {count} values of "
                         f"{dtype.itemsize} bytes; the file holds {len(data) - offset} bytes)")
    pixels = np.frombuffer(data, dtype, count, offset=offset)
    try:
        return images(pixels.reshape(shape, order="F" if fortran_order else "C"), card, args)
    except ValueError as e:
        raise ValueError(str(e).replace("images:", "array:", 1)) from e


def array_head(head: bytes, card: ModelCard, args: BentoArgs) -> str | None:
    """Why a .npy whose header shows it over serve.max_batch_items is refused, or None
    (anything else is left to `array`)."""
    try:
        shape = _npy_header(head)[0]
    except ValueError:
        return None
    return _npy_values_over_limit(shape, card, args)


def grpc_input(request, card: ModelCard, args: BentoArgs) -> np.ndarray:
    """The request's one input tensor "images" (UINT8 or FP32, raw little-endian bytes or typed
    contents) as float32 (N, C, S, S), checked as `images` checks HTTP's."""
    tensor, raw = input_tensor(request, GRPC_INPUT, SERVES)
    if tensor.datatype not in DATATYPES:
        raise ValueError(f"{GRPC_INPUT}: datatype {tensor.datatype!r} not accepted; send pixel "
                         f"values 0..255 as {' or '.join(DATATYPES)}")
    raw_dtype, field, typed_dtype = DATATYPES[tensor.datatype]
    if len(tensor.shape) not in (3, 4):  # counted before a dimension is read
        c, s, _ = _input_shape(card)
        raise ValueError(f"{GRPC_INPUT}: shape {shape_of(tensor)}; expected [N, {c}, {s}, {s}]"
                         + (f" or [N, {s}, {s}]" if c == 1 else ""))
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{GRPC_INPUT}: shape {shape} has a negative dimension")
    _checked_shape(tuple(shape), card, args)  # the batch size before any value is read
    count = _values(shape)
    if raw is not None:
        if len(raw) != count * raw_dtype.itemsize:
            raise ValueError(f"{GRPC_INPUT}: shape {shape} of {tensor.datatype} is "
                             f"{count * raw_dtype.itemsize} bytes; raw_input_contents[0] "
                             f"holds {len(raw)} bytes")
        pixels = np.frombuffer(raw, raw_dtype)
    else:
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise ValueError(f"{GRPC_INPUT}: shape {shape} has {count} values; contents.{field} "
                             f"holds {len(values)} (a {tensor.datatype} tensor's values go "
                             f"in contents.{field} or raw_input_contents)")
        pixels = np.array(values, typed_dtype)
    return images(pixels.reshape(shape), card, args)


def grpc_metadata(card: ModelCard) -> tuple[str, list[str], list[list[int]]]:
    """"images", UINT8 or FP32, [-1, C, S, S] (and [-1, S, S] for a grayscale model)."""
    c, s, _ = _input_shape(card)
    return GRPC_INPUT, list(DATATYPES), [[-1, c, s, s], *([[-1, s, s]] if c == 1 else [])]
