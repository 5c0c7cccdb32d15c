"""The compress stage's text path: ONNX export with the contract's signature, int8 by ONNX
Runtime dynamic quantisation, and the example input MACs are counted on.

Dynamic rather than static int8: a text model's work is MatMuls over activations whose ranges
differ per text, and its largest tensor is the token embedding table (a Gather). Dynamic
quantisation stores MatMul and Gather weights as int8 and computes each activation's scale per
call, so it needs no calibration set and holds accuracy (bench/text_bench.py measures it
against the float and pruned files).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.text.tokens import TextPreprocessing

INPUT, OUTPUT = "input_ids", "logits"


def export_onnx(model: nn.Module, prep: TextPreprocessing, path: Path) -> None:
    """One input `input_ids` int64 [N, L] (dynamic N and L), one output `logits` float32 [N, K].
    The example batch has a padded row, so the traced graph masks padding."""
    example = torch.full((2, 3), prep.mask_id, dtype=torch.int64)
    example[1, 2] = prep.pad_id
    torch.onnx.export(model.eval().cpu(), (example,), str(path), input_names=[INPUT],
                      output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch", 1: "tokens"}, OUTPUT: {0: "batch"}},
                      external_data=False, dynamo=False)


def quantize_int8(float_onnx: Path, out: Path, per_channel: bool, reduce_range: bool) -> None:
    """ORT dynamic quantisation: int8 MatMul and Gather (embedding) weights, activation scales
    computed per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_onnx), str(out), per_channel=per_channel,
                     reduce_range=reduce_range, weight_type=QuantType.QInt8)


def mac_example(prep: TextPreprocessing) -> torch.Tensor:
    """One text of prep.max_tokens tokens, none of them padding: MACs are stated at the longest
    input the model reads (an upper bound per text; attention grows with L squared)."""
    return torch.full((1, prep.max_tokens), prep.mask_id, dtype=torch.int64)
