"""Stage 4: train a registered model on the ingested train split with the training core
(pipeline/core/training.py), its items read as pipeline/core/stream.py's stream: each epoch's
order fixed by (train.seed, epoch) over the shards' row groups and windows of
train.shuffle_bytes, each item seen as the modality's augmenter's views (drawn per item id,
epoch and view), the split held on the device when it fits in engine.cache_bytes, else read a
window at a time (by engine.loader_workers DataLoader workers).

What differs between modalities comes from data.modality's `models` part (pipeline/core/modality.py
Models): the registry and the model params name (or, e.g., a local Hugging Face checkpoint), the
recipe (train.*, or e.g. text.train.max_epochs, lr and batch_size over it) and the files written
beside the weights; and from its `augment` part: the augmenter (decoding, views, model input)
over the preprocessing record the augment stage wrote (data/augmented).
- bf16 autocast on CUDA; channels_last and torch.compile from params; one-cycle LR schedule and
  label smoothing from params.
- Early stopping (pipeline/core/training.py EarlyStopping): the val split is scored after every
  epoch; training stops after train.patience epochs with no better train.monitor (counted from
  the end of the one-cycle warm-up at the earliest), at max_epochs at the latest, and the
  weights saved are the best epoch's. The one-cycle schedule spans max_epochs, so where a run
  stops does not change the steps before it.
- Data parallel with torchrun + DistributedDataParallel (NCCL on GPUs, gloo on CPU): the stage
  joins the process group when torchrun started it (WORLD_SIZE in the environment), or relaunches
  itself under torchrun when `train.processes` > 1. Every rank walks the same global batch order
  and takes every world_size-th item of each global batch, so the optimisation is that of one
  process with the same batch size; a rank augments only its own items' views, and decodes
  only the items they see (pipeline/core/stream.py; each rank still reads every window).
  Only rank 0 logs and writes.
- A checkpoint after every finished epoch and every engine.checkpoint_s seconds within one,
  written atomically into --checkpoints: a folder outside DVC's outs, because DVC deletes a
  stage's outs before it runs the stage. The checkpoint carries a fingerprint of the params,
  data, code (every project file the stage runs, as pipeline/core/import_closure.py finds them)
  and world size that made it; a rerun with the same fingerprint resumes where it was written
  (after an epoch, or after a step within one: the windows before it are not read, the steps
  before it are skipped), any other checkpoint is ignored. Epoch e's batch order and views
  depend only on the seeds and e, and the
  checkpoint holds the optimizer, schedule, torch's RNG state (dropout, SpecAugment masks), the
  epoch's running sums and the early stopping's state (the best epoch and its weights), so a
  resumed run ends with the weights, bit for bit on the CPU, of one never stopped (on more than
  one process, rank 0's RNG state is the one kept). The checkpoint is deleted once the outputs
  are in place.
- Outputs are written to a temporary sibling folder and renamed into place, so a killed stage
  never leaves a half-written model:
    model.safetensors   weights
    model.json          the model card (pipeline/core/card.py): architecture, classes, preprocessing,
                        the params that made it, data hash, the weights' sha256, val scores
    and the files the preprocessing record names (e.g. a text model's tokenizer.json, copied
                        from the augmented folder) and the `models` part adds
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline import StageError
from pipeline.core.card import ModelCard, Recipe, ValScore, sha256_file, write_card
from pipeline.core.dataset import classes_of, data_hash
from pipeline.core.modality import part, preprocessing
from pipeline.params import Params, as_dict, load_params, recipe_section
from pipeline.core.import_closure import source_files
from pipeline.core.stream import EvalSplit, TrainStream
from pipeline.core.training import (EarlyStopping, Resume, fit, make_optimizer, make_schedule,
                                    warmup_epochs)

CHECKPOINT = "last.pt"
LIVE_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")  # per epoch, to DVCLive


# --- checkpoints -------------------------------------------------------------------------------

def fingerprint(params: Params, data_digest: str, augmented: Path, world_size: int) -> str:
    """sha256 of what decides the training trajectory: the data and train params, the
    modality's recipe (what the card records of its section), the ingested and augmented data,
    every project file this stage runs (of the modality in use) and the number of processes."""
    digest = hashlib.sha256(json.dumps(
        {"train": as_dict(params.train), "data": as_dict(params.data),
         "section": as_dict(recipe_section(params)), "world_size": world_size},
        sort_keys=True).encode())
    digest.update(data_digest.encode())  # the ingested data's (data_hash)
    for path in (*sorted(augmented.iterdir()), *source_files("pipeline.stages.__main__", __name__,
                               modality=params.data.modality)):
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


WEIGHTS = "model.safetensors"


def write_outputs(out: Path, weights: dict[str, torch.Tensor], card: ModelCard,
                  files: dict[str, bytes]) -> None:
    """Fill a temporary sibling folder with the weights, their card (the weights' sha256
    added) and `files` (name -> bytes: e.g. a text model's tokenizer), then rename it to `out`:
    all or nothing."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    save_file(weights, tmp / WEIGHTS)
    write_card(tmp, dataclasses.replace(card, weights={WEIGHTS: sha256_file(tmp / WEIGHTS)}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# --- the stage ---------------------------------------------------------------------------------

def relaunch_under_torchrun(argv: list[str], processes: int) -> None:
    """Run this stage again as `processes` torchrun workers on this machine and wait for them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", "-m", "pipeline.stages", "train", *argv]
    print(f"train: train.processes = {processes}: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise StageError(f"train.processes: the {processes} torchrun workers failed "
                         f"(exit {done.returncode}); their errors are above")


def progress_line(m: dict, epochs: int, eta_s: float, unit: str) -> str:
    """One epoch's line; `*` marks an epoch better than every earlier one (train.monitor); eta:
    to max_epochs, the most it can take."""
    return (f"epoch {m['epoch']:3d}/{epochs}  loss {m['train_loss']:.4f}  "
            f"acc {m['train_acc']:.4f}  val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}"
            f"{' *' if m['improved'] else '  '}  "
            f"{m['images_per_s']:,.0f} {unit}/s  {m['seconds']:.2f} s  eta {eta_s:.1f} s")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages train")
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (val split)")
    parser.add_argument("--augmented", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--checkpoints", type=Path, required=True,
                        help="folder for the per-epoch checkpoint; must not be a DVC out")
    args = parser.parse_args(argv)
    params = load_params()
    trainer = part(params.data.modality, "models")
    p = trainer.recipe(params)

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
    if (threads := trainer.torch_threads(params)) is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(p.seed)
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format

    classes = classes_of(args.data)
    prep = preprocessing(params.data.modality)(
        **json.loads((args.augmented / "preprocessing.json").read_text()))
    views = part(params.data.modality, "augment").augmenter(params, prep, args.augmented)
    engine = params.engine
    data = TrainStream(args.data, "train", views, seed=p.seed, shuffle_bytes=p.shuffle_bytes,
                       device=device, workers=engine.loader_workers,
                       cache_bytes=engine.cache_bytes)
    val = EvalSplit(args.data, "val", views, device, engine.cache_bytes)
    model = trainer.create(params, prep, len(classes)).to(device)
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(p.optimizer, model.parameters(), p.lr, p.momentum, p.weight_decay)
    scheduler = make_schedule(p.lr_schedule, optimizer, p.lr,
                              p.max_epochs * data.steps(p.batch_size, world))
    stopping = EarlyStopping(p.monitor, p.patience, warmup_epochs(p.lr_schedule, p.max_epochs))

    data_digest = data_hash(args.data)  # reads every shard: once, for the fingerprint and card
    stamp = fingerprint(params, data_digest, args.augmented, world)
    checkpoint = read_checkpoint(args.checkpoints, stamp)
    history: list[dict] = []
    resume = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        stopping.load_state_dict(checkpoint["stopping"])
        history = checkpoint["history"]
        torch.set_rng_state(checkpoint["rng"])  # dropout, SpecAugment: as they were
        if device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        resume = Resume(**checkpoint["resume"]) if checkpoint["resume"]["step"] else None
        if rank == 0:
            within = f", step {resume.step} of epoch {resume.epochs + 1}" if resume else ""
            print(f"train: resuming after epoch {checkpoint['epoch']}{within} from "
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
            for key in LIVE_METRICS:
                live.log_metric(key, m[key])
            live.next_step()

        for m in history:  # a fresh DVCLive folder gets the resumed epochs first
            log(m)
        run_seconds: list[float] = []

        last_written = time.monotonic()

        def checkpoint_now(where: Resume) -> None:
            """The whole state after a step (within an epoch) or an epoch (step 0)."""
            nonlocal last_written
            state = {"fingerprint": stamp, "epoch": where.epochs, "resume": where.state(),
                     "history": history, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "stopping": stopping.state_dict(), "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda"
                     else None}
            write_checkpoint(args.checkpoints, state)
            last_written = time.monotonic()

        def on_step(where: Resume) -> None:
            if rank == 0 and time.monotonic() - last_written >= params.engine.checkpoint_s:
                checkpoint_now(where)

        def on_epoch(m: dict) -> None:
            history.append(m)
            if rank != 0:
                return
            log(m)
            checkpoint_now(Resume(m["epoch"], 0, 0.0, 0.0, 0))
            run_seconds.append(m["seconds"])
            eta = (p.max_epochs - m["epoch"]) * sum(run_seconds) / len(run_seconds)
            print(progress_line(m, p.max_epochs, eta, prep.UNIT), flush=True)

        fit(net, data, epochs=p.max_epochs, batch_size=p.batch_size, optimizer=optimizer,
            scheduler=scheduler, label_smoothing=p.label_smoothing,
            memory_format=memory_format, val=val, on_epoch=on_epoch,
            start_epoch=len(history), cuda_graph=p.cuda_graph,
            stopping=stopping, resume=resume, on_step=on_step)
        if rank == 0:  # DVCLive's summary (metrics.json): the saved model's epoch, not the last
            best = history[stopping.best_epoch - 1]
            live.summary.update({key: best[key] for key in LIVE_METRICS})
            live.summary.update(best_epoch=best["epoch"], epochs_run=len(history))

    final = history[stopping.best_epoch - 1]  # the epoch whose weights fit left in the model
    if rank == 0:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # The preprocessing record's files come from the augment stage's folder.
        files = {name: (args.augmented / name).read_bytes() for name in prep.MODEL_FILES}
        files.update(trainer.model_files(model))
        card = ModelCard(architecture=trainer.architecture(params),
                         classes=classes, preprocessing=prep, data_hash=data_digest,
                         recipe=Recipe(data=params.data, train=params.train, compress=None,
                                       section=recipe_section(params)),
                         weights={}, val=ValScore(loss=final["val_loss"], accuracy=final["val_acc"]),
                         selection=None)
        write_outputs(args.out, weights, card, files)
        (args.checkpoints / CHECKPOINT).unlink(missing_ok=True)  # done: a rerun starts afresh
        total = sum(m["seconds"] for m in history)
        why = (f"stopped: no better {p.monitor} in train.patience={p.patience} epochs"
               if stopping.stop else "max_epochs reached")
        print(f"train: {card.architecture} on {world} x {device.type}, "
              f"{len(data) * len(history) / total:,.0f} {prep.UNIT}/s over {len(history)} of "
              f"{p.max_epochs} epochs ({why}); saved epoch {final['epoch']}: "
              f"val_loss {final['val_loss']:.4f}, val_acc {final['val_acc']:.4f} -> {args.out}",
              flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
