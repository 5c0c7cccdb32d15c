"""Tensors as an ingested data set, for tests of the training core: each item's float32 values
are its stored bytes, read back through pipeline/core/stream.py as training reads any split."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.dataset import write_items
from pipeline.core.stream import EvalSplit, TrainStream

EVERYTHING = 1 << 62  # cache_bytes that any test split fits in


@dataclass(frozen=True)
class Raw:
    """An Augmenter of float32 items of `shape` stored as raw bytes, seen once an epoch as
    they are."""
    shape: tuple[int, ...]
    views: int = 1

    def decode(self, data: list[bytes]) -> np.ndarray:
        return np.stack([np.frombuffer(b, np.float32).reshape(self.shape) for b in data])

    def view(self, items: torch.Tensor, keys: np.ndarray, epoch: int, view: int) -> torch.Tensor:
        return items

    def to_input(self, items: torch.Tensor) -> torch.Tensor:
        return items


def written(folder: Path, **splits: tuple[torch.Tensor, torch.Tensor]) -> Path:
    """An ingested data set in `folder` of split -> (float32 x, int64 labels)."""
    classes = [str(c) for c in range(int(max(y.max() for _, y in splits.values())) + 1)]
    items = (({"id": f"{split}/{i:06d}", "label": classes[int(label)], "split": split},
              item.float().cpu().numpy().tobytes())
             for split, (x, y) in splits.items() for i, (item, label) in enumerate(zip(x, y)))
    write_items(folder, items, classes)
    return folder


def stream(folder: Path, x: torch.Tensor, *, seed: int = 0, cache: bool = True,
           device: str = "cpu", shuffle_bytes: int = 0, workers: int = 0) -> TrainStream:
    """The train split of `folder` (written) as fit reads it."""
    return TrainStream(folder, "train", Raw(tuple(x.shape[1:])), seed=seed,
                       shuffle_bytes=shuffle_bytes, device=torch.device(device),
                       cache_bytes=EVERYTHING if cache else 0,
                       workers=workers)


def scored(folder: Path, x: torch.Tensor, split: str = "val", device: str = "cpu") -> EvalSplit:
    return EvalSplit(folder, split, Raw(tuple(x.shape[1:])), torch.device(device), EVERYTHING)


def tensors(tmp: Path, x: torch.Tensor, y: torch.Tensor, val_y: torch.Tensor | None = None,
            **options) -> tuple[TrainStream, EvalSplit]:
    """(x, y) as the train split and (x, val_y or y) as the val split, read as fit reads them."""
    folder = written(tmp, train=(x, y), val=(x, y if val_y is None else val_y))
    return stream(folder, x, **options), scored(folder, x, device=options.get("device", "cpu"))
