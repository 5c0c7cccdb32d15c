"""Stage 5: make smaller variants of the float model.

    float.onnx          the float model for ONNX Runtime (one file, dynamic batch)
    pruned.onnx         the model pruned by `compress.prune_method`, fine-tuned with the
                        training recipe (pipeline/training.py), for ONNX Runtime
    int8.onnx           float.onnx statically quantised to int8 (QDQ), activation ranges
                        calibrated on `compress.calibration_images` training images
    model.json          the float model's card with these three files' sha256 and the compress
                        params added to its recipe
    compress.json       MACs, parameters, layer widths, sparsity and file sizes per variant

Two kinds of pruning method, each in its own registry:
  STRUCTURED_PRUNERS rebuild Conv2d/Linear layers with fewer output channels/units (and the next
      layer with fewer inputs): the model really has fewer MACs and parameters, so the ONNX file
      is smaller and faster.
  PRUNERS only zero weights (torch.nn.utils.prune masks): shapes stay, so the pruned file is as
      large and as fast as the float one unless compressed on disk. compress.json says so
      (macs and params unchanged) rather than claiming a saving.

MACs are counted by `count_macs`: forward hooks on every Conv2d and Linear for one image
(out_h * out_w * out_channels * in_channels/groups * kh * kw, resp. in * out); activations,
pooling and batch norm are not counted (on LeNet-5 they are < 2 % of the conv/linear work).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import prune

from pipeline import StageError, models
from pipeline.card import sha256_file, write_card
from pipeline.params import CompressParams, TrainParams, load_params
from pipeline.preprocess import Preprocessing
from pipeline.progress import Progress
from pipeline.training import (fit, make_optimizer, make_schedule, pick_device, steps_per_epoch,
                               to_input)

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


# ---- structured pruning: layers rebuilt smaller ---------------------------------------------

STRUCTURED_PRUNERS: dict[str, Callable[[nn.Module, float], dict[str, tuple[int, int]]]] = {}

# Layers that act on each channel (or unit) separately: a producer's channels can be dropped
# through them. Flatten keeps channel c's features together, at [c * k, (c + 1) * k).
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity,
                nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten)


def register_structured(pruner):
    STRUCTURED_PRUNERS[pruner.__name__] = pruner
    return pruner


def _chains(model: nn.Module) -> list[tuple[nn.Sequential, int, list[int], int]]:
    """(sequential, producer index, channel-wise layer indices, consumer index) for every
    Conv2d/Linear whose output feeds exactly one Conv2d/Linear of the same nn.Sequential through
    channel-wise layers only. A producer whose output leaves its Sequential (the logits, a
    residual block's last conv) is never pruned: code outside may depend on its width."""
    chains = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        layers = list(seq)
        for i, producer in enumerate(layers):
            if not isinstance(producer, (nn.Conv2d, nn.Linear)) or getattr(producer, "groups", 1) != 1:
                continue
            j = i + 1
            while j < len(layers) and isinstance(layers[j], _CHANNELWISE):
                j += 1
            if j == len(layers):
                continue
            consumer, between = layers[j], list(range(i + 1, j))
            flattened = any(isinstance(layers[k], nn.Flatten) for k in between)
            if isinstance(producer, nn.Conv2d):
                ok = (isinstance(consumer, nn.Conv2d) and consumer.groups == 1 and not flattened) or (
                    isinstance(consumer, nn.Linear) and flattened
                    and consumer.in_features % producer.out_channels == 0)
            else:
                ok = isinstance(consumer, nn.Linear)
            if ok:
                chains.append((seq, i, between, j))
    return chains


def _through(layer: nn.Module, value: torch.Tensor, drop: torch.Tensor) -> torch.Tensor | None:
    """What a constant per-channel activation `value` (channels `drop`) becomes after a
    channel-wise layer; None where it does not stay one constant per channel."""
    if isinstance(layer, nn.ReLU):
        return torch.relu(value)
    if isinstance(layer, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.Flatten)):
        return value  # the max or mean of a constant map is that constant
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.running_mean is not None:
        value = (value - layer.running_mean[drop]) / torch.sqrt(layer.running_var[drop] + layer.eps)
        return value * layer.weight[drop] + layer.bias[drop] if layer.affine else value
    return None


def _keep_outputs(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a Conv2d/Linear/BatchNorm with only output channels `keep`."""
    n = len(keep)
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, n, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, 1, layer.bias is not None, layer.padding_mode)
    elif isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, n, layer.bias is not None)
    else:
        new = type(layer)(n, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        if layer.track_running_stats:
            new.running_mean.copy_(layer.running_mean[keep])
            new.running_var.copy_(layer.running_var[keep])
            new.num_batches_tracked.copy_(layer.num_batches_tracked)
    if getattr(layer, "weight", None) is not None:
        new.weight.data = layer.weight.data[keep].clone()
    if getattr(layer, "bias", None) is not None:
        new.bias.data = layer.bias.data[keep].clone()
    return new.to(layer.weight.device if layer.weight is not None else "cpu")


def _keep_inputs(layer: nn.Module, columns: torch.Tensor) -> nn.Module:
    """A copy of a Conv2d/Linear that reads only input channels/features `columns`."""
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(len(columns), layer.out_channels, layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, 1, layer.bias is not None, layer.padding_mode)
    else:
        new = nn.Linear(len(columns), layer.out_features, layer.bias is not None)
    new.weight.data = layer.weight.data[:, columns].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.data.clone()
    return new.to(layer.weight.device)


@torch.no_grad()
def _shrink(seq: nn.Sequential, i: int, between: list[int], j: int, keep_fraction: float
            ) -> tuple[int, int]:
    """Drop the producer seq[i]'s output channels with the smallest L1 weight norm, keeping
    round(n * keep_fraction) (at least 1); rebuild it, the channel-wise layers and the consumer
    seq[j]. Returns (channels before, after).

    A dropped channel whose weights were zero would emit a constant (its bias, through the
    channel-wise layers); that constant is folded into the consumer's bias, so the rebuilt model
    equals "zero the dropped channels' weights" exactly, where that is exact (consumer has a bias
    and no zero padding). Fine-tuning then recovers what the zeroed weights carried."""
    producer, consumer = seq[i], seq[j]
    n = producer.weight.shape[0]
    n_keep = max(1, round(n * keep_fraction))
    if n_keep == n:
        return n, n
    norms = producer.weight.abs().flatten(1).sum(1)
    order = torch.argsort(norms, descending=True, stable=True)
    keep, drop = order[:n_keep].sort().values, order[n_keep:].sort().values

    constant = producer.bias[drop] if producer.bias is not None else torch.zeros_like(norms[drop])
    for k in between:
        constant = None if constant is None else _through(seq[k], constant, drop)

    per_channel = consumer.in_features // n if isinstance(consumer, nn.Linear) else 1
    def columns(channels: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(per_channel, device=channels.device)
        return (channels[:, None] * per_channel + offsets).flatten()

    unpadded = not isinstance(consumer, nn.Conv2d) or all(pad == 0 for pad in (
        consumer.padding if isinstance(consumer.padding, tuple) else (1,)))
    if constant is not None and consumer.bias is not None and unpadded:
        if isinstance(consumer, nn.Conv2d):
            weight_sums = consumer.weight[:, drop].sum(dim=(2, 3))            # (out, dropped)
        else:
            weight_sums = consumer.weight[:, columns(drop)].reshape(
                consumer.out_features, len(drop), per_channel).sum(2)       # (out, dropped)
        consumer.bias += weight_sums @ constant

    seq[i] = _keep_outputs(producer, keep)
    for k in between:
        if isinstance(seq[k], (nn.BatchNorm1d, nn.BatchNorm2d)):
            seq[k] = _keep_outputs(seq[k], keep)
    seq[j] = _keep_inputs(consumer, columns(keep))
    return n, n_keep


@register_structured
def structured_l1(model: nn.Module, amount: float) -> dict[str, tuple[int, int]]:
    """Remove the `amount` fraction of output channels (conv) and units (hidden linear) with the
    smallest L1 weight norm from every layer whose output feeds one next layer; the logits layer
    keeps its width. Returns {layer name: (width before, after)}."""
    # Named by position: a layer is replaced (as a consumer) before it is pruned as a producer.
    names = {id(module): name for name, module in model.named_modules()}
    widths = {}
    for seq, i, between, j in _chains(model):
        widths[f"{names[id(seq)]}.{i}".lstrip(".")] = _shrink(seq, i, between, j, 1 - amount)
    return widths


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear (see the module doc)."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in _prunable(model)]
    was_training = model.training
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in _prunable(model)]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def prune_and_finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: CompressParams,
                       recipe: TrainParams,
                       on_epoch: Callable[[dict], None] | None = None) -> nn.Module:
    """Prune `model` in place by compress.prune_method (either registry), fine-tune it on the
    device tensors x, y for compress.finetune_epochs at compress.finetune_lr with the training
    recipe (train.optimizer, batch_size, seed, lr_schedule, label_smoothing, channels_last) and
    return it in eval mode; `on_epoch(metrics)` after each fine-tuning epoch (training.fit).
    Measured on digits, structured_l1 at 0.5 recovers to 0.9861 (float 0.9916) with the recipe
    and 8 epochs at lr 0.004, to 0.9638 with 3 constant-lr epochs at 0.0005."""
    if p.prune_method in STRUCTURED_PRUNERS:
        STRUCTURED_PRUNERS[p.prune_method](model, p.prune_amount)
    elif p.prune_method in PRUNERS:
        PRUNERS[p.prune_method](model, p.prune_amount)
    else:
        raise StageError(f"compress.prune_method: unknown method {p.prune_method!r} "
                         f"(registered: {', '.join([*STRUCTURED_PRUNERS, *PRUNERS])})")
    # Masks (PRUNERS) stay applied during fine-tuning, so pruned weights remain zero.
    if p.finetune_epochs:
        memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        optimizer = make_optimizer(recipe.optimizer, model.parameters(), p.finetune_lr,
                                   recipe.momentum, recipe.weight_decay)
        total_steps = steps_per_epoch(len(x), recipe.batch_size, 1) * p.finetune_epochs
        fit(model, x, y, epochs=p.finetune_epochs, batch_size=recipe.batch_size,
            optimizer=optimizer,
            scheduler=make_schedule(recipe.lr_schedule, optimizer, p.finetune_lr, total_steps),
            label_smoothing=recipe.label_smoothing, seed=recipe.seed,
            memory_format=memory_format, on_epoch=on_epoch)
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


VARIANT_FILES = ("float.onnx", "pruned.onnx", "int8.onnx")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline compress")
    parser.add_argument("--model", type=Path, required=True, help="float model folder")
    parser.add_argument("--augmented", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    p = params.compress
    device = pick_device()
    progress = Progress("compress")

    model, card = models.load(args.model)
    prep = card.preprocessing
    tensors = load_file(args.augmented / "train.safetensors")
    x, y = to_input(tensors["images"], prep, device), tensors["labels"].to(device)

    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, prep, args.out / "float.onnx")

    input_shape = (prep.channels, prep.image_size, prep.image_size)
    macs = {"float.onnx": count_macs(model, input_shape)}
    n_params = {"float.onnx": count_params(model)}

    progress("float.onnx exported")

    def on_epoch(m: dict) -> None:
        progress(f"{p.prune_method} {p.prune_amount:g}, fine-tune epoch {m['epoch']}/"
                 f"{p.finetune_epochs}  loss {m['train_loss']:.4f}  acc {m['train_acc']:.4f}")

    torch.manual_seed(params.train.seed)
    pruned = prune_and_finetune(model.to(device), x, y, p, params.train, on_epoch).cpu()
    export_onnx(pruned, prep, args.out / "pruned.onnx")
    progress("pruned.onnx exported")
    # Masked weights are still multiplied: a mask pruner saves no MACs, and the count says so.
    macs["pruned.onnx"] = count_macs(pruned, input_shape)
    n_params["pruned.onnx"] = count_params(pruned)
    widths = {name: list(layer.weight.shape[:2]) for name, layer in pruned.named_modules()
              if isinstance(layer, (nn.Conv2d, nn.Linear))}

    # Calibrate on un-augmented originals: augment.py stores them first.
    rng = np.random.default_rng(params.train.seed)
    n_originals = len(x) // (params.augment.copies + 1)
    pick = rng.choice(n_originals, size=min(p.calibration_images, n_originals), replace=False)
    quantize_int8(args.out / "float.onnx", args.out / "int8.onnx", x[pick].cpu().numpy(),
                  p.int8_per_channel, p.int8_reduce_range)
    progress(f"int8.onnx quantised, activations calibrated on {len(pick)} images")

    # int8 runs the float graph's MACs as int8 multiply-accumulates.
    macs["int8.onnx"], n_params["int8.onnx"] = macs["float.onnx"], n_params["float.onnx"]

    report = {"prune_method": p.prune_method,
              "prune_kind": "structured" if p.prune_method in STRUCTURED_PRUNERS else "mask",
              "sparsity": round(sparsity(pruned), 4),
              "macs": macs, "params": n_params,
              "mac_reduction": round(macs["float.onnx"] / macs["pruned.onnx"], 3),
              "pruned_widths": widths,  # layer -> [out, in] channels/units after pruning
              "calibration_images": len(pick),
              "size_bytes": {f: (args.out / f).stat().st_size for f in VARIANT_FILES}}
    (args.out / "compress.json").write_text(json.dumps(report, indent=1) + "\n")
    write_card(args.out, dataclasses.replace(
        card, recipe=dataclasses.replace(card.recipe, compress=p),
        weights={f: sha256_file(args.out / f) for f in VARIANT_FILES}))
    print(f"compress: {json.dumps(report)}")
