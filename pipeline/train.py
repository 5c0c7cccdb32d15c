"""Stage 4: train a registered model on the augmented training tensors.

The whole training set lives on the device as one normalised tensor and batches are slices of
it (no DataLoader in the hot loop). bf16 autocast on CUDA. Per-epoch train/val loss and accuracy
go to DVCLive, which DVC shows as plots. Outputs:
    model.safetensors   weights
    model.json          everything needed to use them: architecture name, classes,
                        preprocessing, resolved params, data hash, final metrics
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import models
from pipeline.ingest import data_hash, load_split, read_manifest
from pipeline.params import as_dict, load_params
from pipeline.preprocess import Preprocessing


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_input(pixels: torch.Tensor | np.ndarray, prep: Preprocessing,
             device: torch.device) -> torch.Tensor:
    """uint8 pixels -> normalised float32 model input on `device`, via the saved preprocessing."""
    pixels = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    return torch.from_numpy(prep.normalize(pixels)).to(device)


def make_optimizer(name: str, parameters, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on device tensors."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            logits = model(x[i:i + batch_size]).float()
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    return loss / len(x), correct / len(x)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
        optimizer: torch.optim.Optimizer, seed: int,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train in place on device tensors x (normalised) and y; return the last epoch's metrics."""
    order = torch.Generator(device="cpu").manual_seed(seed)
    metrics: dict = {}
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(len(x), generator=order).to(x.device)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                logits = model(x[idx])
                loss = F.cross_entropy(logits.float(), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        seconds = time.perf_counter() - start
        metrics = {"epoch": epoch, "train_loss": loss_sum / len(x), "train_acc": correct / len(x),
                   "images_per_s": len(x) / seconds}
        if val is not None:
            metrics["val_loss"], metrics["val_acc"] = score(model, *val, batch_size)
        if on_epoch:
            on_epoch(metrics)
    return metrics


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline train")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (val split)")
    parser.add_argument("--augmented", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    args = parser.parse_args(argv)
    params = load_params()
    p = params.train
    torch.manual_seed(p.seed)
    device = pick_device()

    prep = Preprocessing.from_dict(json.loads((args.augmented / "preprocessing.json").read_text()))
    tensors = load_file(args.augmented / "train.safetensors")
    x, y = to_input(tensors["images"], prep, device), tensors["labels"].to(device)
    val_pixels, val_labels = load_split(args.data, "val", prep)
    val = to_input(val_pixels, prep, device), torch.from_numpy(val_labels).to(device)
    classes = read_manifest(args.data)[1]

    model = models.build(p.model, prep.channels, len(classes), prep.image_size).to(device)
    optimizer = make_optimizer(p.optimizer, model.parameters(), p.lr, p.momentum, p.weight_decay)

    from dvclive import Live  # imported here: it is slow and only the CLI logs

    with Live(str(args.live), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        def log(m: dict) -> None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
                live.log_metric(key, m[key])
            live.next_step()
            print(f"epoch {m['epoch']:3d}/{p.epochs}  loss {m['train_loss']:.4f}  "
                  f"acc {m['train_acc']:.4f}  val_loss {m['val_loss']:.4f}  "
                  f"val_acc {m['val_acc']:.4f}  {m['images_per_s']:,.0f} img/s", flush=True)

        final = fit(model, x, y, epochs=p.epochs, batch_size=p.batch_size, optimizer=optimizer,
                    seed=p.seed, val=val, on_epoch=log)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(model.cpu().state_dict(), args.out / "model.safetensors")
    info = {"model": p.model, "classes": classes, "preprocessing": prep.to_dict(),
            "params": as_dict(params), "data_hash": data_hash(args.data),
            "device": device.type, "metrics": {k: final[k] for k in ("val_loss", "val_acc")}}
    (args.out / "model.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"train: {p.model} on {device}, val_acc {final['val_acc']:.4f} -> {args.out}")
