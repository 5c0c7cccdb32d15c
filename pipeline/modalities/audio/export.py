"""The compress stage's audio side, the `export` part of the modality seam
(pipeline/core/modality.py Export): ONNX export with the issue-13 signature, what int8 quantises, and
the example input MACs are counted on.

The graph takes the raw waveform (its log-mel front end is inside, pipeline/modalities/audio/logmel.py) and
exports to Conv, Mul, Add, MatMul, Log and the body's ops: ONNX Runtime alone serves it.

int8 leaves the front end in float. Quantised too (its STFT kernels, power, mel MatMul and Log
with int8 activations), the conv1d model trained on the built-in digits fell from 0.983 to
0.325 test accuracy, while int8 of the body alone kept 0.983 (bench/audio_train_bench.py,
docs/benchmarks.md Audio): on the test clips the STFT power reaches 7,145 while the median mel
power above the log floor is 0.023, so int8's 256 linear steps (~28 wide) round most of it to 0
before the log.
The float front end's constants (STFT kernels, filterbank) are 660 KB of every variant's file.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from pipeline.modalities.audio.preprocess import AudioPreprocessing

INPUT, OUTPUT = "waveform", "logits"
FRONTEND = "/frontend/"  # the ONNX node names of AudioClassifier.frontend's ops start with it


def export_onnx(model: nn.Module, prep: AudioPreprocessing, path: Path) -> None:
    """One input `waveform` float32 [N, clip_samples] (dynamic N), one output `logits` [N, K]."""
    example = torch.zeros(2, prep.clip_samples)
    torch.onnx.export(model.eval().cpu(), (example,), str(path), input_names=[INPUT],
                      output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                      external_data=False, dynamo=False)


def frontend_nodes(model: Path) -> list[str]:
    """Names of the front end's nodes (STFT Conv, power, mel MatMul, Log, band norm)."""
    return [node.name for node in onnx.load(str(model)).graph.node
            if node.name.startswith(FRONTEND)]


def int8_scope(prepared: Path, folder: Path) -> tuple[Path, dict]:
    """Every op ORT's static quantiser knows, except the front end's."""
    return prepared, {"nodes_to_exclude": frontend_nodes(prepared)}


def mac_example(prep: AudioPreprocessing) -> tuple[torch.Tensor, str]:
    """One clip; its MACs include the front end's (the STFT convolution and the mel MatMul)."""
    return torch.zeros(1, prep.clip_samples), \
        f"one clip of {prep.clip_samples / prep.sample_rate:g} s"
