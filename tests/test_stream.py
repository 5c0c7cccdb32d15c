"""The train split as training reads it (pipeline/core/stream.py), on a user's photos unlike
the demo's: 3-channel PNGs of three classes, resized, in many shards and row groups. An epoch's
batches are the same bytes held in memory or streamed, with any number of DataLoader workers,
resumed from any step, split over ranks; each item is seen once per view, and its views are
drawn anew each epoch."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.dataset import ShardWriter
from pipeline.core.stream import Groups, TrainStream, epoch_windows
from tests.streams import EVERYTHING
from pipeline.modalities.image import augment
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.params import load_params

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "eel"]
N = 300  # training photos
PREP = Preprocessing(image_size=16, channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """300 training photos (20x24 RGB noise with a class-coloured square), a shard per ~64
    items and a row group per ~4 KB of PNGs: 5-8 shards, ~70 row groups."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    with ShardWriter(folder, shard_items=64, row_group_bytes=4096) as out:
        for i in range(N):
            label = i % 3
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            pixels[4:12, 6:14, label] = 255
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            out.add(f"photos/train/{CLASSES[label]}/{i}.png", CLASSES[label], "train",
                    f"{CLASSES[label]}/{i}.png", png.getvalue())
        out.close(CLASSES)
    return folder


def views():
    return augment.augmenter(load_params(REPO / "params.yaml"), PREP, REPO)  # copies: 2


def stream(folder: Path, cache: bool, workers: int = 0, shuffle_bytes: int = 200 * 768) -> TrainStream:
    return TrainStream(folder, "train", views(), seed=3, shuffle_bytes=shuffle_bytes,
                       device=torch.device("cpu"), cache_bytes=EVERYTHING if cache else 0,
                       workers=workers)


def epoch(data: TrainStream, e: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.batches(e, 32, **kw))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(a, b))


def test_the_layout_is_many_shards_and_row_groups(photos):
    groups = Groups.of(photos, "train")
    assert len(groups.files) >= 3 and len(groups.rows) >= 20 and groups.items == N


def test_an_epoch_is_the_same_cached_streamed_and_with_any_workers(photos):
    """Augmentation independent of the worker count: the batches of two epochs, bit for bit."""
    cached, streamed = stream(photos, cache=True), stream(photos, cache=False)
    loaded = stream(photos, cache=False, workers=2)  # its workers persist from epoch to epoch
    for e in (1, 2):
        reference = epoch(cached, e)
        assert same(reference, epoch(streamed, e))
        assert same(reference, epoch(loaded, e))
    assert not same(epoch(cached, 1), epoch(cached, 2))


def test_each_item_is_seen_once_per_view_and_views_change_every_epoch(photos):
    data = stream(photos, cache=True)
    assert len(data) == 3 * N and data.steps(32) == -(-3 * N // 32)
    batches = epoch(data, 1)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (3 * N, 3, 16, 16) and x.dtype == torch.float32
    assert np.bincount(y.numpy()).tolist() == [3 * N // 3] * 3
    # an image's own bytes appear once a view: its original among them, unwarped
    originals = views().to_input(data.cached[0])
    found = [(x == image).flatten(1).all(1).sum().item() for image in originals[:20]]
    assert found == [1] * 20


def test_a_resumed_epoch_continues_with_the_same_batches(photos):
    """From any step, streamed or cached: the batches an uninterrupted epoch has from there
    (the windows before the step are not read)."""
    whole = epoch(stream(photos, cache=True), 4)
    for cache in (True, False):
        data = stream(photos, cache=cache)
        for step in (1, 7, len(whole) - 1):
            assert same(whole[step:], epoch(data, 4, skip_steps=step)), (cache, step)


def test_ranks_take_every_world_th_item_of_each_global_batch(photos):
    """Under torch.distributed the batches are one process's whatever the world size, cached,
    streamed or resumed: a rank's share is its every world-th item of each global batch (a
    tail smaller than the world is skipped)."""
    whole = epoch(stream(photos, cache=True), 1)
    for cache in (True, False):
        data = stream(photos, cache=cache)
        for world in (2, 3):
            ranks = [epoch(data, 1, rank=r, world=world) for r in range(world)]
            assert [len(r) for r in ranks] == [len(whole)] * world, (cache, world)
            for (x, y), *shares in zip(whole, *ranks):
                for r, (xr, yr) in enumerate(shares):
                    assert torch.equal(x[r::world], xr) and torch.equal(y[r::world], yr)
        resumed = epoch(data, 1, skip_steps=5, rank=1, world=2)
        assert same([(x[1::2], y[1::2]) for x, y in whole[5:]], resumed), cache


class Counting:
    """An augmenter that counts the items it decodes and the views it makes."""

    def __init__(self, inner) -> None:
        self.inner, self.views, self.decoded, self.viewed = inner, inner.views, 0, 0

    def decode(self, data: list[bytes]):
        self.decoded += len(data)
        return self.inner.decode(data)

    def view(self, items, *rest):
        self.viewed += len(items)
        return self.inner.view(items, *rest)

    def to_input(self, items):
        return self.inner.to_input(items)


def test_ranks_make_disjoint_views_and_decode_only_what_they_see(photos):
    """Each rank makes only the views of its own positions (the ranks' augmentation does not
    repeat: half each of one process's) and decodes only the items those see: with 3 views of
    an item in a window of shuffled positions, about 1 - (1/2)^3 = 7/8 of its items, against
    all of them before."""
    def counted(**kw) -> Counting:
        augmenter = Counting(views())
        data = TrainStream(photos, "train", augmenter, seed=3, shuffle_bytes=200 * 768,
                           device=torch.device("cpu"), cache_bytes=0, workers=0)
        augmenter.decoded = 0  # (one item decoded to size the windows)
        epoch(data, 1, **kw)
        return augmenter

    one = counted()
    assert (one.decoded, one.viewed) == (N, 3 * N)
    ranks = [counted(rank=r, world=2) for r in range(2)]
    assert [r.viewed for r in ranks] == [3 * N // 2] * 2  # every (item, view) once
    for r in ranks:
        assert 0.75 * N < r.decoded < 0.95 * N, [(r.decoded, r.viewed) for r in ranks]


def test_windows_cover_every_row_group_once_in_a_seeded_order():
    rows = np.array([5, 7, 3, 9, 4, 6])
    windows = list(epoch_windows(rows, 2, 20, seed=0, epoch=1))
    assert sorted(np.concatenate([g for g, _ in windows]).tolist()) == list(range(6))
    assert all(size >= 20 for _, size in windows[:-1])
    assert [size for _, size in windows] == [2 * rows[g].sum() for g, _ in windows]
    again = list(epoch_windows(rows, 2, 20, seed=0, epoch=1))
    assert [g.tolist() for g, _ in windows] == [g.tolist() for g, _ in again]
    other = list(epoch_windows(rows, 2, 20, seed=0, epoch=2))
    assert [g.tolist() for g, _ in windows] != [g.tolist() for g, _ in other]
    assert len(list(epoch_windows(rows, 2, 0, seed=0, epoch=1))) == 1  # 0: the whole split


def test_a_split_is_cached_only_when_its_views_fit(photos):
    one = 3 * 16 * 16  # bytes of one decoded photo

    def cached(cache_bytes: int) -> bool:
        return TrainStream(photos, "train", views(), seed=3, shuffle_bytes=0,
                           device=torch.device("cpu"), cache_bytes=cache_bytes,
                           workers=0).cached is not None

    assert cached(3 * N * one)
    assert not cached(3 * N * one - 1)
