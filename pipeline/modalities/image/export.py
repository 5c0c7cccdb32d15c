"""The compress stage's image side: the `export` part of the modality seam (pipeline/core/modality.py
Export). The ONNX graph takes float32 `input` (N, channels, image_size, image_size) with a
dynamic batch N and returns `logits`; int8 quantises every op ORT's static quantiser knows."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.modalities.image.preprocess import Preprocessing

INPUT, OUTPUT = "input", "logits"


def export_onnx(model: nn.Module, prep: Preprocessing, path: Path) -> None:
    example = torch.zeros(2, prep.channels, prep.image_size, prep.image_size)
    torch.onnx.export(model.eval().cpu(), (example,), str(path), input_names=[INPUT],
                      output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                      external_data=False, dynamo=False)


def mac_example(prep: Preprocessing) -> tuple[torch.Tensor, str]:
    return torch.zeros(1, prep.channels, prep.image_size, prep.image_size), "one image"


def int8_scope(prepared: Path, folder: Path) -> tuple[Path, dict]:
    return prepared, {}
