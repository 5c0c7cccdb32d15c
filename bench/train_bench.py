"""Benchmark: Kiln's train loop against the seed-style PyTorch loop, and Kiln's batched
augmentation against a per-image PIL loop. `python bench/train_bench.py [--runs 3]`.

Method (all in one process, one run of this script, so both sides see the same machine load):
- Data: the built-in digits, ingested with params.yaml's data.* (1259 train, 359 test images)
  into the shards of a temporary folder (as the ingest stage writes them), decoded and resized
  to image.preprocess.image_size, uint8 in memory. Mean/std of the train split, as the augment stage.
- (a) seed-style loop, as in the original idea: torch.utils.data.DataLoader(batch_size=
  image.train.batch_size, shuffle=True, num_workers=0) over a Dataset whose __getitem__ makes a PIL
  image, rotates it by a uniform angle in +-image.augment.rotation_deg (bilinear, black fill), pads it
  by round(image.augment.translate x side) px and crops a random side x side window (the random crop),
  then normalises it into a tensor. PIL, not torchvision: no CPU torchvision build exists here.
  num_workers=0 because DataLoader workers are slower on 2 cores (shared/STACK.md). LeNet-5,
  Adam(image.train.lr), constant LR, plain cross-entropy, fp32, NCHW tensors; on a GPU the model lives
  there and each batch is copied to it, as the original example does.
- (b) Kiln's loop: pipeline.core.training.fit on the train split as the train stage reads it
  (pipeline/core/stream.py, the decoded uint8 images held on the device), every image warped
  afresh each epoch by the image augmenter (image.augment.copies 0, image.train.epoch_augment:
  pipeline.modalities.image.warp.warp, one batched affine grid_sample per window, image.augment.chunk
  images per call: rotation, translation, zoom, drawn per image id and epoch),
  with the train.* params the stage uses:
  channels_last, train.lr_schedule, train.label_smoothing (train.compile as in params.yaml).
  Same model, optimizer, lr, batch size, epochs and seed as (a).
- (c) Kiln's loop with the seed loop's recipe (constant LR, no label smoothing): the loop alone.
- (d) Kiln's loop without any augmentation (the same images every epoch): the model's own
  training step plus the loop, the ceiling for (b) on this model and machine.
- Training images/s = epochs x train images / wall seconds from the first batch of epoch 1 to the
  last optimizer step (data loading, model construction and the test pass excluded), with
  torch's default threads (one per core) unless --threads. Test accuracy = the trained model on
  the test split. Run r uses seed r in every loop; (a) to (d) take turns so that load
  changes hit all four. Reported: the median over runs.
- Augmentation alone: uint8 (N, 1, S, S) train images in, float [0, 1] warped images out.
  Per-image: the Dataset's PIL rotate + pad + random crop in a Python loop. Batched:
  pipeline.modalities.image.warp.warp on the whole set (one call). Images/s, median of --aug-reps repetitions.
- The load average (os.getloadavg) is printed before and after: the machine is shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import training
from pipeline.core.dataset import ShardWriter, load_split
from pipeline.core.stream import TrainStream
from pipeline.modalities.image import augment, models
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.modalities.image.warp import DRAWS, warp
from pipeline.modalities.image.sources import ingest_images as ingest
from pipeline.params import Params, load_params
from train_stage_bench import with_changes  # bench/, beside this file


def load_digits(p: Params) -> tuple[Preprocessing, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The digits ingested into a temporary folder (splits["folder"]) and decoded."""
    raw = Preprocessing(image_size=p.image.preprocess.image_size, channels=p.image.preprocess.channels,
                        mean=[0.0] * p.image.preprocess.channels, std=[1.0] * p.image.preprocess.channels,
                        background=p.image.preprocess.background)
    tmp = Path(tempfile.mkdtemp())
    with ShardWriter(tmp, p.ingest.shard_items, p.ingest.row_group_bytes) as out:
        out.close(ingest(p.image.ingest.source, out, p.data.split, p.data.seed,
                         p.ingest.max_file_bytes))
    splits = {s: load_split(tmp, s, raw) for s in ("train", "test")}
    splits["folder"] = tmp
    scaled = splits["train"][0].astype(np.float64) / 255
    prep = dataclasses.replace(raw, mean=scaled.mean(axis=(0, 2, 3)).tolist(),
                               std=scaled.std(axis=(0, 2, 3)).tolist())
    return prep, splits


def pil_augment(image: np.ndarray, rotation_deg: float, pad: int, rng: random.Random) -> np.ndarray:
    """One (1, S, S) uint8 image -> rotated, randomly cropped float32 (1, S, S) in [0, 1]."""
    side = image.shape[-1]
    pil = Image.fromarray(image[0], mode="L")
    pil = pil.rotate(rng.uniform(-rotation_deg, rotation_deg), resample=Image.Resampling.BILINEAR,
                     fillcolor=0)
    pil = ImageOps.expand(pil, border=pad, fill=0)
    left, top = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    pil = pil.crop((left, top, left + side, top + side))
    return (np.asarray(pil, dtype=np.float32) / 255)[None]


class SeedStyleDataset(torch.utils.data.Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray, prep: Preprocessing,
                 rotation_deg: float, pad: int, seed: int):
        self.pixels, self.labels = pixels, labels
        self.mean, self.std = prep.mean[0], prep.std[0]
        self.rotation_deg, self.pad, self.rng = rotation_deg, pad, random.Random(seed)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = pil_augment(self.pixels[i], self.rotation_deg, self.pad, self.rng)
        return torch.from_numpy((image - self.mean) / self.std), int(self.labels[i])


def seed_style_run(p: Params, prep: Preprocessing, splits: dict, seed: int) -> tuple[float, float]:
    """(training images/s, test accuracy) of the DataLoader + per-sample PIL loop."""
    pixels, labels = splits["train"]
    torch.manual_seed(seed)
    pad = round(p.image.augment.translate * prep.image_size)
    loader = torch.utils.data.DataLoader(
        SeedStyleDataset(pixels, labels, prep, p.image.augment.rotation_deg, pad, seed),
        batch_size=p.image.train.batch_size, shuffle=True, num_workers=0)
    device = training.pick_device()
    model = models.build(p.image.train.model, prep.channels, 10, prep.image_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=p.image.train.lr)
    start = time.perf_counter()
    for _ in range(p.image.train.max_epochs):
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return p.image.train.max_epochs * len(pixels) / seconds, test_accuracy(model, prep, splits)


def kiln_run(p: Params, prep: Preprocessing, splits: dict, seed: int,
             per_epoch_warp: bool = True) -> tuple[float, float]:
    """(training images/s, test accuracy) of pipeline.core.training.fit with per-epoch device warps
    (per_epoch_warp=False: none, the same images every epoch)."""
    t = models.recipe(p)  # params.yaml train with image.train's budget, lr, batch size
    device = training.pick_device()
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    own = dataclasses.replace(p.image, augment=dataclasses.replace(p.image.augment, copies=0),
                              train=dataclasses.replace(p.image.train,
                                                        epoch_augment=per_epoch_warp))
    views = augment.augmenter(dataclasses.replace(p, image=own), prep, splits["folder"])
    data = TrainStream(splits["folder"], "train", views, seed=seed, shuffle_bytes=t.shuffle_bytes,
                       device=device, cache_bytes=p.engine.cache_bytes, workers=0)
    torch.manual_seed(seed)
    model = models.build(p.image.train.model, prep.channels, 10, prep.image_size).to(device)
    model = model.to(memory_format=memory_format)
    optimizer = training.make_optimizer(t.optimizer, model.parameters(), t.lr, t.momentum,
                                     t.weight_decay)
    scheduler = training.make_schedule(t.lr_schedule, optimizer, t.lr,
                                       t.max_epochs * data.steps(t.batch_size))
    net = torch.compile(model) if t.compile else model
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    training.fit(net, data, epochs=t.max_epochs, batch_size=t.batch_size, optimizer=optimizer,
                 scheduler=scheduler, label_smoothing=t.label_smoothing,
                 memory_format=memory_format, cuda_graph=t.cuda_graph)  # fit syncs once per epoch (.tolist of the sums)
    seconds = time.perf_counter() - start
    return t.max_epochs * len(data) / seconds, test_accuracy(model.cpu().float(), prep, splits)


def kiln_seed_recipe_run(p: Params, prep: Preprocessing, splits: dict,
                         seed: int) -> tuple[float, float]:
    """Kiln's loop with the seed loop's recipe (constant LR, no label smoothing): the loop's
    speed and accuracy without the recipe's help."""
    recipe = dataclasses.replace(p.train, lr_schedule="constant", label_smoothing=0.0)
    return kiln_run(dataclasses.replace(p, train=recipe), prep, splits, seed)


def kiln_no_augmentation_run(p: Params, prep: Preprocessing, splits: dict,
                             seed: int) -> tuple[float, float]:
    """Kiln's loop without the per-epoch warp: the model's own step and the loop around it, the
    ceiling of any augmentation scheme on this model and machine."""
    return kiln_run(p, prep, splits, seed, per_epoch_warp=False)


def test_accuracy(model: torch.nn.Module, prep: Preprocessing, splits: dict) -> float:
    pixels, labels = splits["test"]
    x = models.to_input(pixels, prep, torch.device("cpu"))
    return training.score(model.cpu(), [(x, torch.from_numpy(labels))])[1]


def augmentation_rates(p: Params, prep: Preprocessing, splits: dict, reps: int) -> dict:
    pixels = splits["train"][0]
    pad = round(p.image.augment.translate * prep.image_size)
    rng = random.Random(0)
    per_image, batched = [], []
    device = training.pick_device()
    on_device = torch.from_numpy(pixels).to(device)
    draws = np.random.default_rng(0).random((len(pixels), DRAWS))
    warp(on_device[:8].float() / 255, p.image.augment, draws[:8])  # warm-up
    for _ in range(reps):
        start = time.perf_counter()
        np.stack([pil_augment(image, p.image.augment.rotation_deg, pad, rng) for image in pixels])
        per_image.append(len(pixels) / (time.perf_counter() - start))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        warp(on_device.float() / 255, p.image.augment, draws)
        if device.type == "cuda":
            torch.cuda.synchronize()
        batched.append(len(pixels) / (time.perf_counter() - start))
    pil, kiln = statistics.median(per_image), statistics.median(batched)
    return {"per_image_pil": pil, "batched_kiln": kiln, "speedup": kiln / pil}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="training runs per loop (median)")
    parser.add_argument("--aug-reps", type=int, default=9, help="augmentation repetitions (median)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="DOTTED.KEY=VALUE",
                        help="change a params.yaml value for this benchmark")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, "
                        "one per core); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        changed = Path(tmp) / "params.yaml"
        changed.write_text(yaml.safe_dump(with_changes(args.params, args.set), sort_keys=False))
        p = load_params(changed)
    load_before = os.getloadavg()
    prep, splits = load_digits(p)
    device = training.pick_device()
    print(f"device {device}, torch threads {torch.get_num_threads()}, "
          f"{len(splits['train'][0])} train / {len(splits['test'][0])} test images, "
          f"{p.image.train.max_epochs} epochs, batch {p.image.train.batch_size}, lr {p.image.train.lr}, "
          f"changes {args.set}, load average {load_before}",
          flush=True)

    loops = (("seed_style", seed_style_run), ("kiln", kiln_run),
             ("kiln_seed_recipe", kiln_seed_recipe_run),
             ("kiln_no_augmentation", kiln_no_augmentation_run))
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in loops}
    for seed in range(args.runs):
        for name, run in loops:
            runs[name].append(run(p, prep, splits, seed))
            print(f"run {seed} {name:16s} {runs[name][-1][0]:9,.0f} img/s  "
                  f"test acc {runs[name][-1][1]:.4f}", flush=True)
    result = {name: {"images_per_s": statistics.median(r[0] for r in rs),
                     "test_acc": statistics.median(r[1] for r in rs),
                     "runs": [{"images_per_s": r[0], "test_acc": r[1]} for r in rs]}
              for name, rs in runs.items()}
    result["train_speedup"] = result["kiln"]["images_per_s"] / result["seed_style"]["images_per_s"]
    result["train_speedup_seed_recipe"] = (result["kiln_seed_recipe"]["images_per_s"]
                                           / result["seed_style"]["images_per_s"])
    result["ceiling_speedup_no_augmentation"] = (result["kiln_no_augmentation"]["images_per_s"]
                                                 / result["seed_style"]["images_per_s"])
    result["test_acc_gap_pt"] = 100 * (result["kiln"]["test_acc"]
                                       - result["seed_style"]["test_acc"])
    result["augmentation"] = augmentation_rates(p, prep, splits, args.aug_reps)
    result["device"] = str(device)
    result["changes"] = args.set
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}

    aug = result["augmentation"]
    print(f"\n| loop | images/s (median of {args.runs}) | test accuracy (median) |\n"
          "| --- | --- | --- |")
    for name in runs:
        print(f"| {name} | {result[name]['images_per_s']:,.0f} | {result[name]['test_acc']:.4f} |")
    print(f"\ntraining speedup {result['train_speedup']:.2f}x, test accuracy gap "
          f"{result['test_acc_gap_pt']:+.2f} pt (seed recipe: "
          f"{result['train_speedup_seed_recipe']:.2f}x, no augmentation: "
          f"{result['ceiling_speedup_no_augmentation']:.2f}x); "
          f"augmentation {aug['per_image_pil']:,.0f} -> "
          f"{aug['batched_kiln']:,.0f} img/s = {aug['speedup']:.1f}x; "
          f"load average after {result['load_average']['after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
