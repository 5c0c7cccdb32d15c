"""Stage 5: make smaller variants of the float model.

    pruned.safetensors  weights pruned by `compress.prune_method`, then fine-tuned
    float.onnx          the float model for ONNX Runtime (one file, dynamic batch)
    pruned.onnx         the pruned model for ONNX Runtime
    int8.onnx           float.onnx statically quantised to int8 (QDQ), activation ranges
                        calibrated on `compress.calibration_images` training images
    compress.json       sparsity and sizes

torch.nn.utils.prune only zeroes weights: pruned files are as large and as fast as the float
ones unless compressed on disk. The report says so rather than claiming a saving.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune

from pipeline import StageError, models
from pipeline.params import CompressParams, load_params
from pipeline.preprocess import Preprocessing
from pipeline.train import fit, pick_device, to_input

PRUNERS: dict[str, Callable[[nn.Module, float], None]] = {}


def register(pruner: Callable[[nn.Module, float], None]) -> Callable[[nn.Module, float], None]:
    PRUNERS[pruner.__name__] = pruner
    return pruner


def _prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@register
def l1_unstructured(model: nn.Module, amount: float) -> None:
    """Zero the `amount` fraction of smallest-magnitude weights, ranked across all layers."""
    prune.global_unstructured([(m, "weight") for m in _prunable(model)],
                              pruning_method=prune.L1Unstructured, amount=amount)


@register
def l1_channels(model: nn.Module, amount: float) -> None:
    """Zero the `amount` fraction of each conv layer's output channels with the smallest L1 norm."""
    for m in _prunable(model):
        if isinstance(m, nn.Conv2d):
            prune.ln_structured(m, "weight", amount=amount, n=1, dim=0)


def sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in _prunable(model)]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def prune_and_finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: CompressParams,
                       batch_size: int, seed: int) -> nn.Module:
    if p.prune_method not in PRUNERS:
        raise StageError(f"compress.prune_method: unknown method {p.prune_method!r} "
                         f"(registered: {', '.join(PRUNERS)})")
    PRUNERS[p.prune_method](model, p.prune_amount)
    # The masks stay applied during fine-tuning, so pruned weights remain zero.
    optimizer = torch.optim.Adam(model.parameters(), lr=p.finetune_lr)
    if p.finetune_epochs:
        fit(model, x, y, epochs=p.finetune_epochs, batch_size=batch_size, optimizer=optimizer,
            seed=seed)
    for m in _prunable(model):
        if prune.is_pruned(m):
            prune.remove(m, "weight")
    return model.eval()


def export_onnx(model: nn.Module, prep: Preprocessing, path: Path) -> None:
    example = torch.zeros(2, prep.channels, prep.image_size, prep.image_size)
    torch.onnx.export(model.eval().cpu(), (example,), str(path), input_names=["input"],
                      output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      external_data=False, dynamo=False)


def quantize_int8(float_onnx: Path, out: Path, calibration: np.ndarray, per_channel: bool,
                  reduce_range: bool) -> None:
    """ORT static quantisation: int8 weights and activations in QDQ format."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    # Shape inference and graph folding first, as ORT recommends for static quantisation.
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp, "prepared.onnx")
        quant_pre_process(str(float_onnx), str(prepared))
        quantize_static(str(prepared), str(out), Calibration(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, reduce_range=reduce_range)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline compress")
    parser.add_argument("--model", type=Path, required=True, help="float model folder")
    parser.add_argument("--augmented", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    p = params.compress
    device = pick_device()

    model, info = models.load(args.model)
    prep = Preprocessing.from_dict(info["preprocessing"])
    tensors = load_file(args.augmented / "train.safetensors")
    x, y = to_input(tensors["images"], prep, device), tensors["labels"].to(device)

    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, prep, args.out / "float.onnx")

    torch.manual_seed(params.train.seed)
    pruned = prune_and_finetune(model.to(device), x, y, p, params.train.batch_size,
                                params.train.seed).cpu()
    save_file(pruned.state_dict(), args.out / "pruned.safetensors")
    export_onnx(pruned, prep, args.out / "pruned.onnx")

    # Calibrate on un-augmented originals: augment.py stores them first.
    rng = np.random.default_rng(params.train.seed)
    n_originals = len(x) // (params.augment.copies + 1)
    pick = rng.choice(n_originals, size=min(p.calibration_images, n_originals), replace=False)
    quantize_int8(args.out / "float.onnx", args.out / "int8.onnx", x[pick].cpu().numpy(),
                  p.int8_per_channel, p.int8_reduce_range)

    report = {"prune_method": p.prune_method, "sparsity": round(sparsity(pruned), 4),
              "calibration_images": len(pick),
              "size_bytes": {f.name: f.stat().st_size for f in sorted(args.out.glob("*.onnx"))}}
    (args.out / "compress.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"compress: {json.dumps(report)}")
