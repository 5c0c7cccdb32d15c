"""The toy modality's export part: float32 `input` (N, features) -> `logits`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.modalities.points.preprocess import PointsPreprocessing

INPUT = "input"


def export_onnx(model: nn.Module, prep: PointsPreprocessing, path: Path) -> None:
    torch.onnx.export(model.eval().cpu(), (torch.zeros(2, prep.features),), str(path),
                      input_names=[INPUT], output_names=["logits"],
                      dynamic_axes={INPUT: {0: "batch"}, "logits": {0: "batch"}},
                      external_data=False, dynamo=False)


def mac_example(prep: PointsPreprocessing) -> tuple[torch.Tensor, str]:
    return torch.zeros(1, prep.features), "one point"


def int8_scope(prepared: Path, folder: Path) -> tuple[Path, dict]:
    return prepared, {}
