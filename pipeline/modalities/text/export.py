"""The compress stage's text side, the `export` part of the modality seam (pipeline/core/modality.py
Export): ONNX export with the contract's signature, what int8 quantises (the MatMuls with
weights statically, the embedding tables as int8 weights), and the example input MACs are
counted on.

Static int8, not ORT's dynamic quantisation: dynamic computes each activation's scale from the
whole tensor of a call, so a text's answer depended on the other texts of its batch and their
padding (logits up to 0.09 apart between a text sent alone and in a batch of 256 on the built-in
data), and infra validation refused the Bento: /classify_text differed from the evaluated model
on 3 of 1,200 test texts. With fixed (calibrated) ranges a text alone and in any batch give the
same logits (max difference 0.0 over 300 test texts).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.modalities.text.preprocess import TextPreprocessing

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


def quantize_embeddings(model: Path, out: Path) -> Path:
    """`model` with its embedding tables (Gather weights) stored as int8, dequantised per row
    looked up: weights only, so no activation range and nothing that depends on the batch.
    ORT's quantize_dynamic restricted to Gather does exactly that; the compress stage then
    quantises the MatMuls statically. Static QDQ of the Gathers instead cost 4.6 points of test
    accuracy on the built-in data (0.919 -> 0.873), this 0.1 (0.919 -> 0.918)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), op_types_to_quantize=["Gather"], per_channel=False,
                     weight_type=QuantType.QInt8)
    return out


def int8_scope(prepared: Path, folder: Path) -> tuple[Path, dict]:
    """The embedding tables as int8 weights (quantize_embeddings, written into `folder`), then
    static int8 of the MatMuls with weights only."""
    options = {"op_types_to_quantize": ["MatMul", "Gemm"],
               "extra_options": {"MatMulConstBOnly": True}}
    return quantize_embeddings(prepared, folder / "embeddings.onnx"), options


def mac_example(prep: TextPreprocessing) -> tuple[torch.Tensor, str]:
    """One text of prep.max_tokens tokens, none of them padding: MACs are stated at the longest
    input the model reads (an upper bound per text; attention grows with L squared)."""
    example = torch.full((1, prep.max_tokens), prep.mask_id, dtype=torch.int64)
    return example, f"one text of {prep.max_tokens} tokens"
