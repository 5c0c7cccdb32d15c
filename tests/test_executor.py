"""The executor (pipeline/core/executor.py): every pass over items that goes through it gives the
same results in the same order with one process or several, also from a process whose torch
has run its thread pool (the fork server), and a stage run with engine.workers 1 or 2 writes the
same outputs."""
from __future__ import annotations

import functools

import numpy as np
import yaml

from pipeline.core.dataset import load_split, load_texts
from pipeline.core.executor import map_items
from pipeline.modalities.image.preprocess import Preprocessing
from tests.ingested import pack
from tests.project import stage_argv


def test_items_come_back_in_order_with_any_number_of_workers(running):
    items = list(range(103))
    serial = map_items(functools.partial(divmod, 7919), items[1:])
    for workers, batch in ((2, 10), (3, 1), (2, 1000)):
        running(workers, batch)
        assert map_items(functools.partial(divmod, 7919), items[1:]) == serial


def test_a_process_that_ran_torch_threads_maps_in_parallel(running):
    import torch

    torch.set_num_threads(2)
    torch.ones(512, 512) @ torch.ones(512, 512)  # OpenMP's pool is up in this process now
    running(2, 4)
    assert map_items(abs, list(range(-20, 0))) == \
        list(range(20, 0, -1))


def test_split_readers_give_the_same_arrays_in_parallel(tmp_path, running):
    from PIL import Image

    rng = np.random.default_rng(3)
    rows = []
    for i in range(40):
        label = "odd" if i % 2 else "even"
        path = f"images/train/{label}/{i:03}.png"
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12), np.uint8)).save(tmp_path / path)
        text = tmp_path / f"texts/train/{label}/{i:03}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(f"text {i} of the {label} class")
        rows.append({"path": path, "label": label, "split": "train", "source": path})
    prep = Preprocessing(image_size=12, channels=1, mean=[0.5], std=[0.25], background=0)
    pack(tmp_path, rows, ["even", "odd"])
    serial = load_split(tmp_path, "train", prep)
    running(2, 3)
    parallel = load_split(tmp_path, "train", prep)
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])
    pack(tmp_path, [{**r, "path": r["path"].replace("images", "texts").replace(".png", ".txt")}
                    for r in rows], ["even", "odd"])
    texts, labels = load_texts(tmp_path, "train")
    assert texts[5] == "text 5 of the odd class" and labels[5] == 1


def test_validate_writes_the_same_outputs_with_one_or_two_workers(tmp_path, params_writer,
                                                                  stage, running):
    """The validate stage on a user's folder of 90 random 20x20 images in 3 classes, as
    dvc.yaml runs it, with engine.workers 1 and 2 (tasks of 8 images). The stage starts the
    executor from its params.yaml; `running` resets it afterwards."""
    from PIL import Image

    rng, source = np.random.default_rng(7), tmp_path / "source"
    for label in ("ash", "birch", "cedar"):
        (source / label).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)).save(
                source / label / f"{i}.png")
    outputs = {}
    for workers in (1, 2):
        work = tmp_path / f"w{workers}"
        work.mkdir()
        params_writer(work, {"image": {"ingest": {"source": str(source)}},
                             "engine": {"workers": workers, "batch": 8}})
        for name in ("ingest", "validate"):
            code, out = stage(work, *stage_argv(name))
            assert code == 0, out
        outputs[workers] = {name: (work / name).read_bytes() for name in (
            "reports/validation.json", "reports/validation_details.json",
            "reports/data_profile.json")}
    assert outputs[1] == outputs[2]
    assert yaml.safe_load(outputs[1]["reports/validation.json"])["success"] is True
