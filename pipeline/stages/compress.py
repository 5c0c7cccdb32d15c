"""Stage 5: make smaller variants of the float model.

    float.onnx          the float model for ONNX Runtime (one file, dynamic batch)
    pruned.onnx         the model pruned by `compress.prune_method`, fine-tuned with the
                        training recipe (pipeline/core/training.py), for ONNX Runtime
    int8.onnx           float.onnx statically quantised to int8 (QDQ), activation ranges
                        calibrated on `compress.calibration_items` training items (drawn with
                        train.seed, not augmented)
    model.json          the float model's card with these three files' sha256 and the compress
                        params added to its recipe
    compress.json       MACs, parameters, layer widths, sparsity and file sizes per variant

The pruning method is compress.prune_method's, from the registry pipeline/core/pruning.py PRUNERS:
a structured one really removes channels/units (fewer MACs and parameters, a smaller and faster
ONNX file); a mask one only zeros weights, so the pruned file is as large and as fast as the float
one unless compressed on disk, and compress.json says so (macs and params unchanged) rather than
claiming a saving.

MACs are counted by `count_macs_on` on the modality's example input (one image; one text of
text.preprocess.max_tokens tokens): torch's FlopCounterMode, FLOPs / 2 (it counts 2 FLOPs per
multiply-accumulate of conv and matmul); activations, pooling and batch norm are not counted (on
LeNet-5 they are < 2 % of the conv/linear work).

What differs between modalities comes from the float model's card: its `models` part
(pipeline/core/modality.py Models: the training recipe fine-tuning follows), its `augment` part
(the augmenter fine-tuning reads the train split through, pipeline/core/stream.py, as train does)
and its `export` part (Export: the ONNX signature, the MAC example, what int8 quantises). A model that names its own pruning (`pruning_spec`, e.g. a text
encoder's attention heads and FFN units) is pruned by it. The files a model folder carries beside
its weights (e.g. a text model's tokenizer.json) are copied along.
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
from torch import nn
from torch.nn.utils import prune
from torch.utils.flop_counter import FlopCounterMode

from pipeline.core import saved_model
from pipeline.core.card import sha256_file, write_card
from pipeline.core.pruning import CONVS, PRUNERS, is_structured, prunable
from pipeline.core.modality import Export, FitRecipe, card_part, copy_model_files
from pipeline.params import CompressParams, load_params
from pipeline.core.progress import Progress
from pipeline.core.stream import TrainStream, sample_inputs
from pipeline.core.training import fit, make_optimizer, make_schedule, pick_device

def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image (see the module doc): FlopCounterMode's FLOPs / 2."""
    return count_macs_on(model, torch.zeros(1, *input_shape))


def count_macs_on(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of `example` (one input): FlopCounterMode's FLOPs / 2."""
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            device = next(model.parameters()).device
            model.eval()(example.to(device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in prunable(model)]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def prune_and_finetune(model: nn.Module, data, example: torch.Tensor, p: CompressParams,
                       recipe: FitRecipe,
                       on_epoch: Callable[[dict], None] | None = None) -> nn.Module:
    """Prune `model` in place by compress.prune_method (pipeline/core/pruning.py PRUNERS, traced
    on the one input `example`), fine-tune it on `data` (pipeline/core/stream.py TrainStream)
    for compress.finetune_epochs at compress.finetune_lr
    with the training recipe (train.optimizer, batch_size, seed, lr_schedule, label_smoothing,
    channels_last) and return it in eval mode; `on_epoch(metrics)` after each fine-tuning epoch
    (training.fit). Measured on digits (docs/benchmarks.md, Compression), structured_l1 at 0.5
    with the recipe and 8 epochs at lr 0.004: LeNet-5 0.9805 (float 0.9889), resnet_small
    0.9944 (float 0.9944)."""
    PRUNERS.get(p.prune_method)(model, p.prune_amount, example.to(data.device))
    # A mask method's masks stay applied during fine-tuning, so pruned weights remain zero.
    if p.finetune_epochs:
        memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        optimizer = make_optimizer(recipe.optimizer, model.parameters(), p.finetune_lr,
                                   recipe.momentum, recipe.weight_decay)
        total_steps = data.steps(recipe.batch_size) * p.finetune_epochs
        fit(model, data, epochs=p.finetune_epochs, batch_size=recipe.batch_size,
            optimizer=optimizer,
            scheduler=make_schedule(recipe.lr_schedule, optimizer, p.finetune_lr, total_steps),
            label_smoothing=recipe.label_smoothing,
            memory_format=memory_format, cuda_graph=recipe.cuda_graph, on_epoch=on_epoch)
    for m in prunable(model):
        if prune.is_pruned(m):
            prune.remove(m, "weight")
    return model.eval()


def quantize_int8(float_onnx: Path, out: Path, calibration: np.ndarray, per_channel: bool,
                  reduce_range: bool, export: Export) -> None:
    """ORT static quantisation: int8 weights and activations in QDQ format, activation ranges
    fixed by the calibration inputs, so an input's answer does not depend on the batch it came
    in. The modality's `export` part names the graph's input and says what is quantised
    (int8_scope)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {export.INPUT: batch}

    # Shape inference and graph folding first, as ORT recommends for static quantisation.
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp, "prepared.onnx")
        try:
            quant_pre_process(str(float_onnx), str(prepared))
        except Exception as e:  # noqa: BLE001 - ORT raises a bare Exception for this
            # ORT's symbolic shape inference gives up on Hugging Face BERT graphs
            # (text.preprocess.pretrained); ONNX's own shape inference, which it also runs, is enough for
            # quantising MatMuls (it folds less: the kiln text_encoder's int8 file was 9% larger).
            if "symbolic shape inference" not in str(e):
                raise
            quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
        prepared, options = export.int8_scope(prepared, Path(tmp))
        quantize_static(str(prepared), str(out), Calibration(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, reduce_range=reduce_range, **options)


VARIANT_FILES = ("float.onnx", "pruned.onnx", "int8.onnx")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages compress")
    parser.add_argument("--model", type=Path, required=True, help="float model folder")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (train split)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    p = params.compress
    device = pick_device()
    progress = Progress("compress")

    model, card = saved_model.load(args.model)
    prep = card.preprocessing
    trainer, export = card_part(card, "models"), card_part(card, "export")
    if (threads := trainer.torch_threads(params)) is not None:
        torch.set_num_threads(threads)
    recipe, engine = trainer.recipe(params), params.engine
    views = card_part(card, "augment").augmenter(params, prep, args.model)
    data = TrainStream(args.data, "train", views, seed=recipe.seed,
                       shuffle_bytes=recipe.shuffle_bytes, device=device,
                       workers=engine.loader_workers, cache_bytes=engine.cache_bytes)
    mac_input, mac_of = export.mac_example(prep)

    args.out.mkdir(parents=True, exist_ok=True)
    copy_model_files(card, args.model, args.out)
    export.export_onnx(model, prep, args.out / "float.onnx")

    macs = {"float.onnx": count_macs_on(model, mac_input)}
    n_params = {"float.onnx": count_params(model)}

    progress("float.onnx exported")

    def on_epoch(m: dict) -> None:
        progress(f"{p.prune_method} {p.prune_amount:g}, fine-tune epoch {m['epoch']}/"
                 f"{p.finetune_epochs}  loss {m['train_loss']:.4f}  acc {m['train_acc']:.4f}")

    torch.manual_seed(params.train.seed)
    pruned = prune_and_finetune(model.to(device), data, mac_input, p, recipe, on_epoch).cpu()
    export.export_onnx(pruned, prep, args.out / "pruned.onnx")
    progress("pruned.onnx exported")
    # Masked weights are still multiplied: a mask pruner saves no MACs, and the count says so.
    macs["pruned.onnx"] = count_macs_on(pruned, mac_input)
    n_params["pruned.onnx"] = count_params(pruned)
    widths = {name: list(layer.weight.shape[:2]) for name, layer in pruned.named_modules()
              if isinstance(layer, (*CONVS, nn.Linear, nn.Embedding))}
    heads = {name: getattr(m, "num_heads", None) or m.num_attention_heads  # ours, or BERT's
             for name, m in pruned.named_modules()
             if hasattr(m, "num_heads") or hasattr(m, "num_attention_heads")}

    calibration = sample_inputs(args.data, "train", views, p.calibration_items,
                                params.train.seed).numpy()
    quantize_int8(args.out / "float.onnx", args.out / "int8.onnx", calibration,
                  p.int8_per_channel, p.int8_reduce_range, export)
    n_calibration = len(calibration)
    progress(f"int8.onnx quantised, activations calibrated on {n_calibration} {prep.UNIT}")

    # int8 runs the float graph's MACs as int8 multiply-accumulates.
    macs["int8.onnx"], n_params["int8.onnx"] = macs["float.onnx"], n_params["float.onnx"]

    report = {"prune_method": p.prune_method,
              "prune_kind": "structured" if is_structured(p.prune_method) else "mask",
              "sparsity": round(sparsity(pruned), 4),
              "macs": macs, "macs_of": mac_of, "params": n_params,
              "mac_reduction": round(macs["float.onnx"] / macs["pruned.onnx"], 3),
              "pruned_widths": widths,  # layer -> [out, in] channels/units after pruning
              **({"heads": heads} if heads else {}),  # attention -> heads left after pruning
              "calibration_images": n_calibration,
              "size_bytes": {f: (args.out / f).stat().st_size for f in VARIANT_FILES}}
    (args.out / "compress.json").write_text(json.dumps(report, indent=1) + "\n")
    write_card(args.out, dataclasses.replace(
        card, recipe=dataclasses.replace(card.recipe, compress=p),
        weights={f: sha256_file(args.out / f) for f in VARIANT_FILES}))
    print(f"compress: {json.dumps(report)}")
