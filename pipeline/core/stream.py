"""The training split as the training core reads it, epoch by epoch, in bounded memory.

An epoch is a sequence of (item, view) positions: each of the split's N items is seen `views`
times (the modality's Augmenter, pipeline/core/modality.py: the item itself and augmented views
of it), N x views positions in all, fixed by (train.seed, epoch) alone:
- the split's row groups (pipeline/core/dataset.py: at most ingest.row_group_bytes of items each,
  in shard order) are shuffled;
- taken in that order, they are grouped into windows of at least train.shuffle_bytes of
  decoded positions (0: one window, the whole split);
- each window's positions are shuffled.
Batches are consecutive positions of the sequence, across windows. An item's view is drawn from
its id's hash, the seed, the epoch and the view (item_draws, item_rng), so it does not depend on
the batch, the window, the worker or the process that makes it. Resuming after step s of an
epoch skips the windows before position s x batch and reads on from there. Under
torch.distributed a rank's share of a global batch is its every world-th position, so the
batches are those of one process whatever the world size; each rank makes only the views of
its own positions (a world-th of every window's) and decodes only the items they see (with v
views an item, 1 - (1 - 1/world)^v of the window's). Every rank still reads each window's
row groups: the ranks do not read disjoint shards.

Two ways to the same sequence, bit for bit (engine.cache_bytes picks one; no output depends on
which):
- cached: the split decoded once and held on the device; each window's views made there;
- streamed: each window's row groups read, decoded and augmented when it is reached, by
  engine.loader_workers DataLoader worker processes (in order, two windows ahead each), or by
  the training process itself when 0. It holds those windows and a batch, never the split.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.dataset import (classes_of, item_batches, sample, shard_files, split_labels,
                                   stored)

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def item_keys(ids: Iterable[str]) -> np.ndarray:
    """uint64 per item id: the first 8 bytes of its BLAKE2b digest."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(),
                                       "little") for i in ids), dtype=np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _salted(keys: np.ndarray, salt: tuple[int, ...]) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = np.zeros(1, np.uint64)
        for value in salt:
            h = _mix(h ^ (np.uint64(value) + GOLDEN))
        return _mix(np.asarray(keys, np.uint64) ^ h)


def item_draws(keys: np.ndarray, salt: tuple[int, ...], count: int) -> np.ndarray:
    """float64 (n, count) uniform in [0, 1): `count` draws per item key for `salt` (e.g. (seed,
    epoch, view)), counter-based (SplitMix64), so an item's draws depend on its key and the salt
    alone. Vectorised: 1M items x 5 draws ~0.2 s."""
    with np.errstate(over="ignore"):
        counters = np.arange(1, count + 1, dtype=np.uint64) * GOLDEN
        z = _mix(_salted(keys, salt)[:, None] + counters[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def item_rng(key: np.uint64, salt: tuple[int, ...]) -> np.random.Generator:
    """A numpy generator of one item's own stream for `salt`: for draws too many to take from
    item_draws (an audio clip's noise samples)."""
    return np.random.default_rng(int(_salted(np.array([key], np.uint64), salt)[0]))


# --- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Groups:
    """A split's row groups in shard order: (file, group) and item count of each."""
    files: list[Path]
    where: list[tuple[int, int]]
    rows: np.ndarray      # int64 items per group
    starts: np.ndarray    # int64 index of each group's first item in the split

    @classmethod
    def of(cls, folder: Path, split: str) -> Groups:
        files = shard_files(folder, split)
        where, rows = [], []
        for f, path in enumerate(files):
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                where.append((f, g))
                rows.append(meta.row_group(g).num_rows)
        rows = np.array(rows, np.int64)
        return cls(files, where, rows, np.cumsum(rows) - rows)

    @property
    def items(self) -> int:
        return int(self.rows.sum())


def epoch_windows(rows: np.ndarray, views: int, shuffle_items: int, seed: int,
                  epoch: int) -> Iterator[tuple[np.ndarray, int]]:
    """(groups, positions) of every window of epoch `epoch`, in order (see the module doc):
    each of at least `shuffle_items` positions (0: one window)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    current, size = [], 0
    for u in order:
        current.append(u)
        size += int(rows[u]) * views
        if shuffle_items and size >= shuffle_items:
            yield np.array(current), size
            current, size = [], 0
    if current:
        yield np.array(current), size


# --- making a window --------------------------------------------------------------------------

def views_of(augmenter, items, keys: np.ndarray, labels: np.ndarray, item: np.ndarray,
             view: np.ndarray, epoch: int):
    """(inputs, labels) of positions seeing item[i] (an index into the items tensor, their keys
    and int64 labels) as view[i]: each view made by augmenter.view for the items seen as it."""
    import torch

    out = torch.empty((len(item), *items.shape[1:]), dtype=items.dtype, device=items.device)
    for v in range(augmenter.views):
        at = np.flatnonzero(view == v)
        if len(at):
            picked = item[at]
            out[torch.from_numpy(at).to(items.device)] = augmenter.view(
                items[torch.from_numpy(picked).to(items.device)], keys[picked], epoch, v)
    return out, torch.from_numpy(labels[item])


def read_groups(groups: Groups, indices: np.ndarray, classes: dict[str, int]
                ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(stored bytes, item keys, int64 labels) of the row groups `indices`, in that order."""
    data, ids, labels = [], [], []
    for u in indices:
        f, g = groups.where[u]
        table = pq.ParquetFile(groups.files[f]).read_row_group(
            g, columns=["id", "label", "bytes"])
        data.extend(table.column("bytes").to_pylist())
        ids.extend(table.column("id").to_pylist())
        labels.extend(classes[c] for c in table.column("label").to_pylist())
    return data, item_keys(ids), np.array(labels, np.int64)


def owned(first: int, count: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Which of `count` consecutive positions of an epoch, the first at `first`, are rank's:
    its every world-th position of each global batch of `batch_size`."""
    return (np.arange(first, first + count) % batch_size) % world == rank


class _Windows:
    """A torch map-style Dataset of windows: (epoch, w, groups, positions, drop, first, batch
    size, rank, world) -> window w's (inputs, labels) from its position `drop` on (the epoch's
    position `first`), the rank's own positions of them, read from the shards (or `cached`),
    decoded and viewed. A DataLoader over it keeps the order its sampler gives, whatever its
    workers."""

    def __init__(self, groups: Groups, classes: dict[str, int], augmenter, seed: int,
                 cached=None):
        self.groups, self.classes, self.augmenter = groups, classes, augmenter
        self.seed, self.cached = seed, cached

    def __getitem__(self, window: tuple):
        import torch

        epoch, w, units, positions, drop, first, batch_size, rank, world = window
        order = np.random.default_rng([self.seed, epoch, 1 + w]).permutation(positions)[drop:]
        order = order[owned(first, len(order), batch_size, rank, world)]
        n = int(self.groups.rows[units].sum())  # the window's items
        needed, item = np.unique(order % n, return_inverse=True)  # the items its positions see
        with torch.no_grad():
            if self.cached is not None:
                items, keys, labels = self.cached
                at = np.concatenate([np.arange(self.groups.starts[u],
                                               self.groups.starts[u] + self.groups.rows[u])
                                     for u in units])[needed]
                items = items[torch.from_numpy(at).to(items.device)]
                keys, labels = keys[at], labels[at]
            else:
                data, keys, labels = read_groups(self.groups, units, self.classes)
                items = torch.from_numpy(self.augmenter.decode([data[i] for i in needed]))
                keys, labels = keys[needed], labels[needed]
            return views_of(self.augmenter, items, keys, labels, item, order // n, epoch)


class _Todo:
    """A DataLoader's sampler: the windows the current pass needs, set before each pass (its
    workers persist from epoch to epoch)."""

    def __init__(self) -> None:
        self.windows: list = []

    def __iter__(self):
        return iter(self.windows)

    def __len__(self) -> int:
        return len(self.windows)


class TrainStream:
    """One split of an ingested data set as training batches: (model input, int64 labels) on
    `device`, epoch by epoch (see the module doc). A split whose decoded items, every view of
    them, fit in `cache_bytes` is held on the device; a larger one is read window by window,
    with `workers` DataLoader worker processes (0: in this one)."""

    def __init__(self, folder: Path, split: str, augmenter, *, seed: int, shuffle_bytes: int,
                 device, cache_bytes: int, workers: int):
        self.augmenter, self.seed, self.device, self.workers = augmenter, seed, device, workers
        self.groups = Groups.of(folder, split)
        one = item_bytes(folder, split, augmenter)
        self.shuffle_items = shuffle_bytes and max(1, shuffle_bytes // one)  # per window
        classes = {c: i for i, c in enumerate(classes_of(folder))}
        cached = None
        if one * self.groups.items * augmenter.views <= cache_bytes:
            import torch

            data, keys, labels = read_groups(self.groups, np.arange(len(self.groups.rows)),
                                             classes)
            cached = (torch.from_numpy(augmenter.decode(data)).to(device), keys, labels)
            self.workers = 0  # nothing left to read
        self.cached = cached
        self.reader = _Windows(self.groups, classes, augmenter, seed, cached)
        self.todo, self.loader = _Todo(), None

    def __len__(self) -> int:
        """Positions per epoch: items x views."""
        return self.groups.items * self.augmenter.views

    def steps(self, batch_size: int, world: int = 1) -> int:
        """Global batches per epoch; a tail batch smaller than world is skipped (fit)."""
        n = len(self)
        return sum(1 for i in range(0, n, batch_size) if min(batch_size, n - i) >= world)

    def _windows(self, epoch: int, skip: int, batch_size: int, rank: int, world: int
                 ) -> Iterator:
        """The epoch's windows from position `skip` on: the inputs and labels of the rank's
        positions of each, its positions before `skip` left out (a resumed epoch reads no
        window it has done)."""
        todo, start = [], 0
        for w, (units, positions) in enumerate(epoch_windows(
                self.groups.rows, self.augmenter.views, self.shuffle_items, self.seed, epoch)):
            if start + positions > skip:
                drop = max(0, skip - start)
                todo.append((epoch, w, units, positions, drop, start + drop, batch_size, rank,
                             world))
            start += positions
        if not self.workers:
            return (self.reader[window] for window in todo)
        if self.loader is None:
            from torch.utils.data import DataLoader

            # Workers from a fork server, as the executor's: a process forked from one that
            # has run torch's thread pools can hang in them. They persist across epochs.
            self.loader = DataLoader(self.reader, batch_size=None, sampler=self.todo,
                                     num_workers=self.workers, persistent_workers=True,
                                     multiprocessing_context="forkserver")
        self.todo.windows = todo
        return iter(self.loader)

    def batches(self, epoch: int, batch_size: int, skip_steps: int = 0, rank: int = 0,
                world: int = 1) -> Iterator:
        """(model input, labels) of each global batch of `epoch` from step `skip_steps` on, on
        the device; under torch.distributed this rank's share (every world-th item of the
        global batch). A tail batch smaller than world is skipped."""
        n, skip = len(self), skip_steps * batch_size
        shares = iter([len(range(rank, min(batch_size, n - s), world))  # the rank's, per batch
                       for s in range(skip, n, batch_size) if min(batch_size, n - s) >= world])
        share = next(shares, None)
        xs, ys, held = [], [], 0
        for x, y in self._windows(epoch, skip, batch_size, rank, world):
            xs.append(x)
            ys.append(y)
            held += len(x)
            while share is not None and held >= share:
                yield self._batch(xs, ys, share)
                held -= share
                share = next(shares, None)
            # the tail a window leaves, copied: the window is freed before the next is made
            xs, ys = [t.clone() for t in xs], [t.clone() for t in ys]

    def _batch(self, xs: list, ys: list, size: int):
        """The first `size` positions held in xs, ys (taken out of them) as model input."""
        import torch

        taken_x, taken_y = [], []
        while size:
            x, y = xs[0], ys[0]
            if len(x) <= size:
                taken_x.append(xs.pop(0))
                taken_y.append(ys.pop(0))
                size -= len(x)
            else:
                taken_x.append(x[:size])
                taken_y.append(y[:size])
                xs[0], ys[0], size = x[size:], y[size:], 0
        x = taken_x[0] if len(taken_x) == 1 else torch.cat(taken_x)
        y = taken_y[0] if len(taken_y) == 1 else torch.cat(taken_y)
        return (self.augmenter.to_input(x.to(self.device, non_blocking=True)),
                y.to(self.device, non_blocking=True))


class EvalSplit:
    """One split as (model input, int64 labels) batches in shard order, without augmentation:
    the val split train scores every epoch. Decoded once and held on the device when its items
    fit in `cache_bytes`."""

    def __init__(self, folder: Path, split: str, augmenter, device, cache_bytes: int):
        self.folder, self.split, self.augmenter, self.device = Path(folder), split, augmenter, device
        self.index = {c: i for i, c in enumerate(classes_of(folder))}
        fits = item_bytes(folder, split, augmenter) * len(split_labels(folder, split)) \
            <= cache_bytes
        self.cached = list(self._read(1 << 14)) if fits else None

    def _read(self, size: int) -> Iterator:
        import torch

        for rows, data in item_batches(self.folder, [self.split], size):
            yield (torch.from_numpy(self.augmenter.decode(data)).to(self.device),
                   torch.tensor([self.index[r["label"]] for r in rows], dtype=torch.int64,
                                device=self.device))

    def batches(self, size: int) -> Iterator:
        if self.cached is None:
            for x, y in self._read(size):
                yield self.augmenter.to_input(x), y
            return
        for x, y in self.cached:
            for i in range(0, len(x), size):
                yield self.augmenter.to_input(x[i:i + size]), y[i:i + size]


def item_bytes(folder: Path, split: str, augmenter) -> int:
    """Bytes of one decoded item of the split (the augmenter decodes to a fixed shape); 0 when
    the split holds none."""
    for _, data in item_batches(folder, [split], 1):
        return augmenter.decode(data).nbytes
    return 0


def sample_inputs(folder: Path, split: str, augmenter, n: int, seed: int):
    """Model input (a CPU tensor) of n items of the split drawn with `seed` (pipeline/core/
    dataset.py sample: all of them when it holds no more), in shard order, not augmented:
    what int8 calibration sees."""
    import torch

    _, picked = stored(folder, split, sample(Groups.of(folder, split).items, n, seed))
    return augmenter.to_input(torch.from_numpy(augmenter.decode(picked)))
