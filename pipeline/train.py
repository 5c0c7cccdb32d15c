"""Stage 4: train a registered model on the augmented training tensors, the way the fast-training
records (airbench, hlb-CIFAR10) do: data on the device, batched augmentation there, few syncs.

- The whole training set lives on the device as one normalised tensor and batches are index
  slices of it (no DataLoader in the hot loop). With `train.epoch_augment` every epoch also warps
  the whole set once, per-sample random, with pipeline.augment.warp (one batched grid_sample).
- bf16 autocast on CUDA; channels_last and torch.compile from params; one-cycle LR schedule and
  label smoothing from params.
- Data parallel with torchrun + DistributedDataParallel (NCCL on GPUs, gloo on CPU): the stage
  joins the process group when torchrun started it (WORLD_SIZE in the environment), or relaunches
  itself under torchrun when `train.processes` > 1. Every rank walks the same global batch order
  and takes every world_size-th sample of each global batch, so the optimisation is that of one
  process with the same batch size. Only rank 0 logs and writes.
- A checkpoint per finished epoch, written atomically into --checkpoints: a folder outside DVC's
  outs, because DVC deletes a stage's outs before it runs the stage. The checkpoint carries a
  fingerprint of the params, data, code and world size that made it; a rerun with the same
  fingerprint resumes after the last finished epoch, any other checkpoint is ignored. Epoch e's
  batch order and warps depend only on (seed, e), so a resumed run ends exactly where an
  uninterrupted one does. The checkpoint is deleted once the outputs are in place.
- Outputs are written to a temporary sibling folder and renamed into place, so a killed stage
  never leaves a half-written model:
    model.safetensors   weights
    model.json          everything needed to use them: architecture name, classes,
                        preprocessing, resolved params, data hash, final metrics
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline import StageError, augment, models
from pipeline.ingest import data_hash, load_split, read_manifest
from pipeline.params import AugmentParams, Params, as_dict, load_params
from pipeline.preprocess import Preprocessing

CHECKPOINT = "last.pt"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_input(pixels: torch.Tensor | np.ndarray, prep: Preprocessing,
             device: torch.device) -> torch.Tensor:
    """uint8 pixels -> normalised float32 model input on `device`, via the saved preprocessing."""
    pixels = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    return torch.from_numpy(prep.normalize(pixels)).to(device)


def make_optimizer(name: str, parameters, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """Fused kernels (one call for all parameters; CPU and CUDA): Adam's step measured 3.5%
    of LeNet-5's training throughput on 2 CPU cores (bench/train_bench.py method, 15 epochs)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=True)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, lr: float,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """`constant`: none. `onecycle`: warm up to lr over 30% of the steps, then cosine down."""
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    return None


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Global batches per epoch; a tail batch smaller than world_size is skipped (see fit)."""
    return sum(1 for i in range(0, n, batch_size) if min(batch_size, n - i) >= world_size)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of epoch `epoch`: a function of (seed, epoch) only, so resume replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def epoch_warper(pixels: torch.Tensor, prep: Preprocessing, p: AugmentParams, seed: int,
                 memory_format: torch.memory_format) -> Callable[[int], torch.Tensor]:
    """epoch -> that epoch's normalised inputs: every image of uint8 `pixels` (on the device)
    warped once by pipeline.augment.warp, per-sample random, seeded by (seed, epoch)."""
    scaled = pixels.float() / 255
    mean = torch.tensor(prep.mean, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, device=pixels.device).view(1, -1, 1, 1)

    def inputs(epoch: int) -> torch.Tensor:
        # warp draws from torch's global generator: fork it so training's RNG is untouched.
        with torch.random.fork_rng(devices=[pixels.device] if pixels.is_cuda else []):
            torch.manual_seed(seed * 1_000_003 + epoch)
            warped = augment.warp(scaled, p)
        return ((warped - mean) / std).contiguous(memory_format=memory_format)

    return inputs


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


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
        on_epoch: Callable[[dict], None] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        label_smoothing: float = 0.0,
        epoch_inputs: Callable[[int], torch.Tensor] | None = None,
        start_epoch: int = 0,
        memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Train in place on device tensors x (normalised) and y for epochs start_epoch+1..epochs;
    return the last epoch's metrics ({} when there is none left to run).

    The optional arguments default to "off". `batch_size` is the global batch: under
    torch.distributed each rank takes every world_size-th sample of it and DDP averages the
    gradients. `epoch_inputs(e)`, when given, replaces x for epoch e (per-epoch augmentation).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    metrics: dict = {}
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        start = time.perf_counter()
        inputs = x if epoch_inputs is None else epoch_inputs(epoch)
        perm = epoch_order(len(x), seed, epoch).to(x.device)
        # Sums stay on the device: one sync per epoch instead of one per batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        correct = torch.zeros((), dtype=torch.float64, device=x.device)
        seen = 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < world:  # a rank without a sample would leave DDP's all-reduce waiting
                continue
            idx = idx[rank::world]
            xb, yb = inputs[idx].contiguous(memory_format=memory_format), y[idx]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(idx)
        totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64,
                                                              device=x.device)])
        if world > 1:
            dist.all_reduce(totals)
        loss_total, correct_total, seen_total = totals.tolist()
        seconds = time.perf_counter() - start
        metrics = {"epoch": epoch, "train_loss": loss_total / seen_total,
                   "train_acc": correct_total / seen_total, "seconds": seconds,
                   "images_per_s": seen_total / seconds}
        if val is not None:
            metrics["val_loss"], metrics["val_acc"] = score(unwrap(model), *val, batch_size)
        if on_epoch:
            on_epoch(metrics)
    return metrics


# --- checkpoints -------------------------------------------------------------------------------

def fingerprint(params: Params, data: Path, augmented: Path, world_size: int) -> str:
    """sha256 of what decides the training trajectory: train/augment/data params, the ingested
    and augmented data, the training code and the number of processes."""
    digest = hashlib.sha256(json.dumps(
        {"train": as_dict(params.train), "augment": as_dict(params.augment),
         "data": as_dict(params.data), "world_size": world_size}, sort_keys=True).encode())
    digest.update(data_hash(data).encode())
    for path in (augmented / "train.safetensors", augmented / "preprocessing.json",
                 Path(__file__), Path(models.__file__), Path(augment.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_checkpoint(folder: Path, state: dict) -> None:
    """Write-then-rename, so the checkpoint on disk is always a whole one."""
    folder.mkdir(parents=True, exist_ok=True)
    # Like .pytest_cache: the folder ignores itself, so git never picks up checkpoints.
    (folder / ".gitignore").write_text("*\n")
    tmp = folder / f".{CHECKPOINT}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / CHECKPOINT)


def read_checkpoint(folder: Path, expected: str) -> dict | None:
    """The checkpoint in `folder` if it was made with the `expected` fingerprint, else None."""
    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is only a missed resume
        print(f"train: ignoring unreadable checkpoint {path}: {e}", flush=True)
        return None
    if state.get("fingerprint") != expected:
        print(f"train: ignoring checkpoint {path}: made from other params, data or code",
              flush=True)
        return None
    return state


def write_outputs(out: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
    """Fill a temporary sibling folder, then rename it to `out`: all or nothing."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "model.safetensors")
    (tmp / "model.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# --- the stage ---------------------------------------------------------------------------------

def relaunch_under_torchrun(argv: list[str], processes: int) -> None:
    """Run this stage again as `processes` torchrun workers on this machine and wait for them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", "-m", "pipeline", "train", *argv]
    print(f"train: train.processes = {processes}: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise StageError(f"train.processes: the {processes} torchrun workers failed "
                         f"(exit {done.returncode}); their errors are above")


def progress_line(m: dict, epochs: int, eta_s: float) -> str:
    return (f"epoch {m['epoch']:3d}/{epochs}  loss {m['train_loss']:.4f}  "
            f"acc {m['train_acc']:.4f}  val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}  "
            f"{m['images_per_s']:,.0f} img/s  {m['seconds']:.2f} s  eta {eta_s:.1f} s")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline train")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (val split)")
    parser.add_argument("--augmented", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--checkpoints", type=Path, required=True,
                        help="folder for the per-epoch checkpoint; must not be a DVC out")
    args = parser.parse_args(argv)
    params = load_params()
    p = params.train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and p.processes > 1:
        relaunch_under_torchrun(argv, p.processes)
        return
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(p.seed)
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format

    prep = Preprocessing.from_dict(json.loads((args.augmented / "preprocessing.json").read_text()))
    tensors = load_file(args.augmented / "train.safetensors")
    x = to_input(tensors["images"], prep, device).contiguous(memory_format=memory_format)
    y = tensors["labels"].to(device)
    val_pixels, val_labels = load_split(args.data, "val", prep)
    val = (to_input(val_pixels, prep, device).contiguous(memory_format=memory_format),
           torch.from_numpy(val_labels).to(device))
    classes = read_manifest(args.data)[1]
    epoch_inputs = (epoch_warper(tensors["images"].to(device), prep, params.augment, p.seed,
                                 memory_format) if p.epoch_augment else None)

    model = models.build(p.model, prep.channels, len(classes), prep.image_size).to(device)
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(p.optimizer, model.parameters(), p.lr, p.momentum, p.weight_decay)
    scheduler = make_schedule(p.lr_schedule, optimizer, p.lr,
                              p.epochs * steps_per_epoch(len(x), p.batch_size, world))

    stamp = fingerprint(params, args.data, args.augmented, world)
    checkpoint = read_checkpoint(args.checkpoints, stamp)
    history: list[dict] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        history = checkpoint["history"]
        if rank == 0:
            print(f"train: resuming after epoch {checkpoint['epoch']} from "
                  f"{args.checkpoints / CHECKPOINT}", flush=True)

    net: nn.Module = DistributedDataParallel(model) if world > 1 else model
    if p.compile:
        net = torch.compile(net)

    if rank == 0:
        from dvclive import Live  # imported here: it is slow and only the CLI logs
        live_context = Live(str(args.live), dvcyaml=None, save_dvc_exp=False, report=None)
    else:
        live_context = contextlib.nullcontext()
    with live_context as live:
        def log(m: dict) -> None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
                live.log_metric(key, m[key])
            live.next_step()

        for m in history:  # a fresh DVCLive folder gets the resumed epochs first
            log(m)
        run_seconds: list[float] = []

        def on_epoch(m: dict) -> None:
            history.append(m)
            if rank != 0:
                return
            log(m)
            state = {"fingerprint": stamp, "epoch": m["epoch"], "history": history,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None}
            write_checkpoint(args.checkpoints, state)
            run_seconds.append(m["seconds"])
            eta = (p.epochs - m["epoch"]) * sum(run_seconds) / len(run_seconds)
            print(progress_line(m, p.epochs, eta), flush=True)

        fit(net, x, y, epochs=p.epochs, batch_size=p.batch_size, optimizer=optimizer,
            seed=p.seed, val=val, on_epoch=on_epoch, scheduler=scheduler,
            label_smoothing=p.label_smoothing, epoch_inputs=epoch_inputs,
            start_epoch=len(history), memory_format=memory_format)

    final = history[-1]
    if rank == 0:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        info = {"model": p.model, "classes": classes, "preprocessing": prep.to_dict(),
                "params": as_dict(params), "data_hash": data_hash(args.data),
                "device": device.type, "processes": world,
                "metrics": {k: final[k] for k in ("val_loss", "val_acc")}}
        write_outputs(args.out, weights, info)
        (args.checkpoints / CHECKPOINT).unlink(missing_ok=True)  # done: a rerun starts afresh
        total = sum(m["seconds"] for m in history)
        print(f"train: {p.model} on {world} x {device.type}, val_acc {final['val_acc']:.4f}, "
              f"{len(x) * p.epochs / total:,.0f} img/s over {p.epochs} epochs -> {args.out}",
              flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
