"""The training core the train stage and compress's fine-tuning share: batches from the train
split's stream (pipeline/core/stream.py: held on the device when it fits, else read window by
window), bf16 autocast on CUDA, fused optimizers, the one-cycle schedule, label smoothing and
DDP-aware batching, the way the fast-training records (airbench, hlb-CIFAR10) do it; and early
stopping on the val split (EarlyStopping), which keeps the best epoch's weights.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(name: str, parameters, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """Fused kernels (one call for all parameters; CPU and CUDA): Adam's step measured 3.5%
    of LeNet-5's training throughput on 2 CPU cores (bench/train_bench.py method, 15 epochs)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=True)


ONECYCLE_WARMUP = 0.3  # share of the steps one-cycle warms up over (OneCycleLR's pct_start)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, lr: float,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """`constant`: none. `onecycle`: warm up to lr over 30% of the steps, then cosine down."""
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                   pct_start=ONECYCLE_WARMUP)
    return None


def warmup_epochs(name: str, epochs: int) -> int:
    """Epochs until schedule `name` spanning `epochs` reaches its peak LR: early stopping waits
    for them. Measured on 330 photos of 3 shapes (tests/test_recipes.py), one-cycle over 30
    epochs: val loss rose from epoch 1 to 5 while the LR was still low, and fell from epoch 7 to
    a val accuracy of 0.85; patience counted from epoch 1 had stopped the run at epoch 6 and
    kept the untrained epoch 1."""
    return math.ceil(ONECYCLE_WARMUP * epochs) if name == "onecycle" else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def score(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
          ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over (input, labels) batches on its device."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, correct / n


class LossAndHits(nn.Module):
    """A training step's forward: (mean cross-entropy, correct predictions) of a batch, under
    bf16 autocast on CUDA. Autocast's weight-cast cache is off: graph capture
    (torch.cuda.make_graphed_callables) refuses it, and a step casts each weight once anyway."""

    def __init__(self, model: nn.Module, label_smoothing: float,
                 memory_format: torch.memory_format):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.memory_format = memory_format

    def forward(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb = xb.contiguous(memory_format=self.memory_format)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=xb.is_cuda, cache_enabled=False):
            logits = self.model(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=self.label_smoothing)
        return loss, (logits.argmax(1) == yb).sum()


@dataclass
class Resume:
    """Where a run stands within an epoch: `epochs` done, `step` batches of the next one done,
    and that epoch's running sums (loss x items and correct, tensors or floats; items seen)."""
    epochs: int
    step: int
    loss_sum: torch.Tensor | float
    correct: torch.Tensor | float
    seen: int

    def state(self) -> dict:
        """For a checkpoint: plain numbers."""
        return {"epochs": self.epochs, "step": self.step, "loss_sum": float(self.loss_sum),
                "correct": float(self.correct), "seen": self.seen}


MONITORS = {"val_loss": -1, "val_acc": 1}  # train.monitor -> its better direction


class EarlyStopping:
    """train.patience and train.monitor: after each epoch, whether the val metric improved on
    the best epoch so far (a copy of whose weights it keeps), and whether `patience` epochs have
    passed without an improvement since the best epoch or the end of the LR warm-up
    (`warmup` epochs, warmup_epochs), whichever is later: then training stops. Its state_dict
    goes into the train stage's checkpoint, so a resumed run stops, and keeps, exactly what an
    uninterrupted one does. Every rank of a DDP run scores the same val split with the same
    weights, so every rank takes the same decision."""

    def __init__(self, monitor: Literal["val_loss", "val_acc"], patience: int, warmup: int):
        self.monitor, self.patience, self.warmup = monitor, patience, warmup
        self.best_epoch = 0          # 0: no epoch scored yet
        self.best_value: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.last_epoch = 0

    def update(self, epoch: int, metrics: dict, model: nn.Module) -> bool:
        """Record epoch `epoch`'s metrics (and `model`'s weights if they are the best so far);
        True when it improved on the best epoch."""
        value = metrics[self.monitor]
        self.last_epoch = epoch
        if self.best_value is not None and \
                MONITORS[self.monitor] * (value - self.best_value) <= 0:
            return False
        self.best_epoch, self.best_value = epoch, value
        self.best_weights = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        return True

    @property
    def stop(self) -> bool:
        """`patience` epochs since the best one, and since the warm-up's end."""
        return self.best_epoch > 0 and \
            self.last_epoch - max(self.best_epoch, self.warmup) >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        """Load the best epoch's weights into `model`."""
        if self.best_weights is not None:
            unwrap(model).load_state_dict(self.best_weights)

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_value": self.best_value,
                "best_weights": self.best_weights, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_epoch, self.best_value = state["best_epoch"], state["best_value"]
        self.best_weights, self.last_epoch = state["best_weights"], state["last_epoch"]


def fit(model: nn.Module, data, *, epochs: int, batch_size: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None, label_smoothing: float,
        memory_format: torch.memory_format, cuda_graph: bool, val=None,
        on_epoch: Callable[[dict], None] | None = None,
        start_epoch: int = 0, stopping: EarlyStopping | None = None,
        resume: Resume | None = None, on_step: Callable[[Resume], None] | None = None) -> dict:
    """Train in place on `data` (pipeline/core/stream.py TrainStream: each epoch's batches) for
    epochs start_epoch+1..epochs; return the last epoch's metrics ({} when there is none left).

    With `stopping` (it needs `val`), each epoch's val metrics go to it before `on_epoch` sees
    them (with "improved": whether it was the best epoch so far), training ends early once it
    says stop, and the model is left with the best epoch's weights.

    The recipe (optimizer, schedule, smoothing, memory format) is required: callers take it from
    params.yaml. The hooks after it are optional: `val` (pipeline/core/stream.py EvalSplit) is
    scored after every epoch and `on_epoch(metrics)` called; `start_epoch` resumes after that
    many epochs, `resume` within the next one (its first resume.step steps are skipped, their
    sums restored: with the model, optimizer, schedule and torch's RNG state of that step
    restored by the caller, the run goes on as if never stopped); `on_step(Resume)` is called
    after every step, for the caller's checkpoints; `cuda_graph` (image.train.cuda_graph,
    audio.train.cuda_graph) replays each full batch's forward and backward as CUDA graphs, on
    CUDA in one process (elsewhere, and for a tail batch, the same step runs eagerly).
    `batch_size` is the global batch: under torch.distributed each rank takes every
    world_size-th item of it and DDP averages the gradients.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    metrics: dict = {}
    step = LossAndHits(model, label_smoothing, memory_format)
    graphed: nn.Module | None = None  # captured at the first full batch (shapes are fixed)
    graphs = cuda_graph and data.device.type == "cuda" and world == 1
    if stopping is not None and val is None:
        raise ValueError("early stopping needs a val split")
    for epoch in range(start_epoch + 1, epochs + 1):
        if stopping is not None and stopping.stop:  # a resumed run that had already stopped
            break
        model.train()
        start = time.perf_counter()
        # Sums stay on the device: one sync per epoch instead of one per batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
        correct = torch.zeros((), dtype=torch.float64, device=data.device)
        seen, skip = 0, 0
        if resume is not None and epoch == start_epoch + 1:
            skip = resume.step
            loss_sum.fill_(resume.loss_sum)
            correct.fill_(resume.correct)
            seen = resume.seen
        for b, (xb, yb) in enumerate(data.batches(epoch, batch_size, skip, rank, world),
                                     start=skip):
            if graphs and len(xb) == batch_size:
                if graphed is None:
                    graphed = torch.cuda.make_graphed_callables(
                        LossAndHits(model, label_smoothing, memory_format), (xb, yb))
                loss, hits = graphed(xb, yb)
            else:
                loss, hits = step(xb, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum.add_(loss.detach(), alpha=len(yb))
            correct.add_(hits)
            seen += len(yb)
            if on_step is not None:
                on_step(Resume(epoch - 1, b + 1, loss_sum, correct, seen))
        totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64,
                                                              device=data.device)])
        if world > 1:
            dist.all_reduce(totals)
        loss_total, correct_total, seen_total = totals.tolist()
        seconds = time.perf_counter() - start
        metrics = {"epoch": epoch, "train_loss": loss_total / seen_total,
                   "train_acc": correct_total / seen_total, "seconds": seconds,
                   "images_per_s": seen_total / seconds}
        if val is not None:
            metrics["val_loss"], metrics["val_acc"] = score(unwrap(model),
                                                            val.batches(batch_size))
        if stopping is not None:
            metrics["improved"] = stopping.update(epoch, metrics, model)
        if on_epoch:
            on_epoch(metrics)
    if stopping is not None:
        stopping.restore_best(model)
    return metrics
