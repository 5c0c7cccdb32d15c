"""The train stage as the pipeline runs it: `python -m pipeline.stages train` on the built-in digits,
with the real params.yaml shrunk (conftest's params_writer). Determinism, kill-and-resume from
the per-epoch checkpoint, 2-process DistributedDataParallel (gloo) against one process,
per-epoch augmentation."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.stages import augment as augment_stage
from pipeline.core import saved_model, training
from pipeline.stages import train
from pipeline.core.card import ModelCard, Recipe, ValScore, read_card, sha256_file
from pipeline.core.dataset import ShardWriter, load_split
from pipeline.modalities.image import models as image_models
from pipeline.core.stream import item_keys
from pipeline.modalities.image import augment as image_augment
from pipeline.modalities.image.preprocess import Preprocessing
from pipeline.modalities.image.sources import ingest_images as ingest
from pipeline.params import load_params, recipe_section
from tests.conftest import merged
from tests.streams import tensors

REPO = Path(__file__).resolve().parents[1]
# On top of conftest's SHRINK: the records' recipe (fresh on-device warps each epoch, no offline
# copies), so resume and DDP are tested with the per-epoch augmentation's RNG in play. 8 epochs:
# ~0.1 s each here.
CHANGES = {"image": {"augment": {"copies": 0}, "train": {"max_epochs": 8, "epoch_augment": True}}}
EPOCHS = CHANGES["image"]["train"]["max_epochs"]


def stage_argv(name: str) -> list[str]:
    return ["--data", "data/ingested", "--augmented", "data/augmented", "--out", f"models/{name}",
            "--live", f"reports/{name}", "--checkpoints", f".kiln/checkpoints/{name}"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}


def run_stage(project: Path, name: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline.stages", "train", *stage_argv(name)],
                          cwd=project, env=env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def outputs(project: Path, name: str) -> tuple[ValScore, dict[str, torch.Tensor]]:
    """The val scores in the model card (read_card checks the weights' sha256) and the weights."""
    folder = project / "models" / name
    return read_card(folder).val, load_file(folder / train.WEIGHTS)


def accuracy_on_test_split(project: Path, name: str) -> float:
    model, card = saved_model.load(project / "models" / name)
    prep = card.preprocessing
    pixels, labels = load_split(project / "data/ingested", "test", prep)
    x = image_models.to_input(pixels, prep, torch.device("cpu"))
    return training.score(model, [(x, torch.from_numpy(labels))])[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, params_writer) -> Path:
    """Ingested, augmented digits and the shrunk params, as the stages before train leave them."""
    root = tmp_path_factory.mktemp("train")
    params_writer(root, CHANGES)
    p = load_params(root / "params.yaml")
    with ShardWriter(root / "data/ingested", p.ingest.shard_items,
                     p.ingest.row_group_bytes) as out:
        out.close(ingest(p.image.ingest.source, out, p.data.split, p.data.seed,
                         p.ingest.max_file_bytes))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        augment_stage.main(["--data", "data/ingested", "--out", "data/augmented"])
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def reference(project) -> str:
    """One uninterrupted single-process run, the yardstick of the tests below."""
    done = run_stage(project, "reference")
    assert "train: lenet5 on 1 x cpu" in done.stdout
    assert not (project / ".kiln/checkpoints/reference" / train.CHECKPOINT).exists()
    return "reference"


def test_same_seed_same_data_gives_identical_metrics(project, reference):
    """Two runs of the stage, each in a process of its own as `dvc repro` starts it (in the
    test's process, torch's thread count is whatever an earlier test left: another reduction
    order, another last bit)."""
    progress = run_stage(project, "again").stdout
    assert "epoch   8/8" in progress and "images/s" in progress and "eta 0.0 s" in progress
    metrics, weights = outputs(project, "again")
    ref_metrics, ref_weights = outputs(project, reference)
    assert metrics == ref_metrics
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    assert metrics.accuracy > 0.9


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(project, reference, params_writer):
    """SIGKILL within an epoch (after epoch 2, some steps into the next), then the stage again:
    it resumes at that step and ends with the reference run's weights, bit for bit. Its
    project checkpoints after every step (engine.checkpoint_s 0: no output depends on it), so
    the kill lands within an epoch."""
    killed = project / "killed"
    killed.mkdir()
    (killed / "data").symlink_to(project / "data")
    params_writer(killed, merged(CHANGES, {"engine": {"checkpoint_s": 0}}))
    checkpoint = killed / ".kiln/checkpoints/killed" / train.CHECKPOINT
    child = subprocess.Popen([sys.executable, "-m", "pipeline.stages", "train", *stage_argv("killed")],
                             cwd=killed, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)

    def written() -> dict:
        return torch.load(checkpoint, weights_only=True)["resume"]

    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists():  # the first step's checkpoint: ~0.1 s into training
            assert child.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        while not (written()["epochs"] >= 2 and written()["step"] >= 3):
            assert child.poll() is None, "the run finished before it could be killed"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    killed_at = written()
    assert 2 <= killed_at["epochs"] < EPOCHS and killed_at["step"] >= 1
    assert not (killed / "models/killed").exists()  # nothing DVC could take for an output

    done = run_stage(killed, "killed")
    epochs, step = killed_at["epochs"], killed_at["step"]
    assert f"train: resuming after epoch {epochs}, step {step} of epoch {epochs + 1}" \
        in done.stdout
    assert f"epoch {epochs:3d}/" not in done.stdout  # finished epochs were not rerun
    metrics, weights = outputs(killed, "killed")
    ref_metrics, ref_weights = outputs(project, reference)
    assert metrics == ref_metrics
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    live = (killed / "reports/killed/plots/metrics/val_acc.tsv").read_text().splitlines()
    assert len(live) == 1 + EPOCHS  # header + every epoch, resumed ones too
    assert not checkpoint.exists()


def test_training_stops_when_val_stops_improving_and_saves_the_best_epoch(project, params_writer):
    """A budget of 30 epochs and patience 2: the stage stops once val loss has not improved for
    2 epochs after the warm-up, and the model it saves scores the best epoch's val loss, not
    the last one's."""
    stops = project / "stops"
    stops.mkdir()
    (stops / "data").symlink_to(project / "data")
    params_writer(stops, merged(CHANGES, {"image": {"train": {"max_epochs": 30}},
                                          "train": {"patience": 2}}))
    done = run_stage(stops, "stops")
    curve = [float(line.split("\t")[1]) for line in
             (stops / "reports/stops/plots/metrics/val_loss.tsv").read_text().splitlines()[1:]]
    best = int(np.argmin(curve)) + 1
    assert len(curve) < 30 and len(curve) - max(best, 9) == 2  # warm-up: 30% of 30 epochs
    assert (f"over {len(curve)} of 30 epochs (stopped: no better val_loss in train.patience=2 "
            f"epochs); saved epoch {best}: val_loss {curve[best - 1]:.4f}") in done.stdout
    assert best < len(curve) and curve[-1] > curve[best - 1]
    summary = json.loads((stops / "reports/stops/metrics.json").read_text())
    assert (summary["best_epoch"], summary["epochs_run"]) == (best, len(curve))
    model, card = saved_model.load(stops / "models/stops")
    pixels, labels = load_split(stops / "data/ingested", "val", card.preprocessing)
    x = image_models.to_input(pixels, card.preprocessing, torch.device("cpu"))
    val_loss = training.score(model, [(x[i:i + 128], torch.from_numpy(labels[i:i + 128]))
                                      for i in range(0, len(x), 128)])[0]
    assert val_loss == pytest.approx(curve[best - 1], abs=1e-5) == card.val.loss


def test_a_resumed_fit_stops_and_keeps_what_an_uninterrupted_one_does(tmp_path):
    """The early stopping's state (best epoch, its weights) travels with the checkpoint: fit
    resumed after epoch 3 stops at the same epoch with the same weights. Val labels are noise,
    so val loss soon stops improving."""
    x, y = digit_halves(96, "cpu")
    noise = torch.from_numpy(np.random.default_rng(1).integers(0, 2, 96))
    data, val = tensors(tmp_path, x, y, noise)

    def start() -> tuple:
        torch.manual_seed(0)
        model = image_models.build("lenet5", channels=1, classes=2, image_size=32)
        optimizer = training.make_optimizer("adam", model.parameters(), 2e-3, 0.9, 0.0)
        schedule = training.make_schedule("onecycle", optimizer, 2e-3, 20 * 2)
        return model, optimizer, schedule, training.EarlyStopping("val_loss", 2, warmup=0)

    def fit(parts: tuple, start_epoch: int = 0, on_epoch=None) -> dict:
        model, optimizer, schedule, stopping = parts
        return training.fit(model, data, epochs=20, batch_size=64, optimizer=optimizer,
                            scheduler=schedule, label_smoothing=0.1,
                            memory_format=torch.contiguous_format, cuda_graph=False,
                            val=val, on_epoch=on_epoch, start_epoch=start_epoch,
                            stopping=stopping)

    whole = start()
    fit(whole)
    assert whole[3].stop and whole[3].last_epoch < 20

    class Killed(Exception):
        pass

    saved = {}

    def kill_after_3(m: dict) -> None:
        if m["epoch"] == 3:
            saved.update((name, copy.deepcopy(part.state_dict()))
                         for name, part in zip("mosx", first))
            raise Killed

    first = start()
    with pytest.raises(Killed):
        fit(first, on_epoch=kill_after_3)
    resumed = start()
    for name, part in zip("mosx", resumed):
        part.load_state_dict(saved[name])
    fit(resumed, start_epoch=3)
    assert (resumed[3].best_epoch, resumed[3].last_epoch) == (whole[3].best_epoch,
                                                              whole[3].last_epoch)
    assert all(torch.equal(resumed[0].state_dict()[k], v) for k, v in whole[0].state_dict().items())


def test_a_fit_stopped_after_any_step_resumes_to_the_same_weights(tmp_path):
    """Killed after any step of any epoch and resumed from what the train stage's checkpoint
    holds at that step (model, optimizer, one-cycle schedule, torch's RNG state, the epoch's
    running sums), fit ends with the weights, bit for bit, and the epoch metrics of a run never
    stopped. The model has dropout, so torch's RNG is in play (a text encoder's dropout, audio's
    SpecAugment masks); 60 items in batches of 16: a short last batch too."""
    x = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (60, 12)).astype(np.float32))
    y = torch.from_numpy(np.random.default_rng(3).integers(0, 3, 60))
    epochs, steps = 3, 4
    data, _ = tensors(tmp_path, x, y)

    def start() -> tuple:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
        optimizer = training.make_optimizer("adam", model.parameters(), 1e-2, 0.9, 0.0)
        return model, optimizer, training.make_schedule("onecycle", optimizer, 1e-2,
                                                        epochs * steps)

    def fit(parts: tuple, history: list, **resumed) -> None:
        model, optimizer, schedule = parts
        training.fit(model, data, epochs=epochs, batch_size=16, optimizer=optimizer,
                     scheduler=schedule, label_smoothing=0.1,
                     memory_format=torch.contiguous_format, cuda_graph=False,
                     on_epoch=lambda m: history.append((m["train_loss"], m["train_acc"])),
                     **resumed)

    whole, whole_history = start(), []
    fit(whole, whole_history)

    class Killed(Exception):
        pass

    for epoch in range(epochs):
        for step in range(1, steps + 1):
            saved, history = {}, []

            def kill(where: training.Resume) -> None:
                if (where.epochs, where.step) == (epoch, step):
                    saved.update(state=where.state(), rng=torch.get_rng_state(),
                                 parts=[copy.deepcopy(p.state_dict()) for p in first])
                    raise Killed

            first = start()
            with pytest.raises(Killed):
                fit(first, history, on_step=kill)
            resumed = start()
            for part, state in zip(resumed, saved["parts"]):
                part.load_state_dict(state)
            torch.set_rng_state(saved["rng"])
            state = saved["state"]
            fit(resumed, history, start_epoch=state["epochs"], resume=training.Resume(**state))
            assert history == whole_history, (epoch, step)
            assert all(torch.equal(resumed[0].state_dict()[k], v)
                       for k, v in whole[0].state_dict().items()), (epoch, step)


def test_checkpoint_from_other_params_or_data_is_ignored(project, tmp_path, capsys, params_writer):
    folder = tmp_path / "checkpoints"
    train.write_checkpoint(folder, {"fingerprint": "a", "epoch": 3})
    assert train.read_checkpoint(folder, "a")["epoch"] == 3
    assert (folder / ".gitignore").read_text() == "*\n"
    assert train.read_checkpoint(folder, "b") is None
    assert "made from other params, data or code" in capsys.readouterr().out
    p = load_params(project / "params.yaml")
    data = train.data_hash(project / "data/ingested")
    stamp = train.fingerprint(p, data, project / "data/augmented", 1)
    assert stamp == train.fingerprint(p, data, project / "data/augmented", 1)
    assert stamp != train.fingerprint(p, data, project / "data/augmented", 2)
    assert stamp != train.fingerprint(p, "0" * 64, project / "data/augmented", 1)  # other data
    params_writer(tmp_path, merged(CHANGES, {"image": {"train": {"lr": 0.001}}}))
    other = load_params(tmp_path / "params.yaml")
    assert stamp != train.fingerprint(other, data, project / "data/augmented", 1)


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(project, reference, params_writer):
    """train.processes: 2 relaunches the stage under torchrun; rank 0 alone writes."""
    ddp = project / "ddp"
    ddp.mkdir()
    (ddp / "data").symlink_to(project / "data")
    params_writer(ddp, merged(CHANGES, {"train": {"processes": 2}}))
    done = run_stage(ddp, "reference")
    assert "train: lenet5 on 2 x cpu" in done.stdout
    assert done.stdout.count("epoch   8/8") == 1  # only rank 0 reports
    metrics, _ = outputs(ddp, "reference")
    ref_metrics, _ = outputs(project, reference)
    assert abs(metrics.accuracy - ref_metrics.accuracy) <= 0.01
    assert abs(accuracy_on_test_split(ddp, "reference")
               - accuracy_on_test_split(project, reference)) <= 0.01
    assert sorted(p.name for p in (ddp / "models").iterdir()) == ["reference"]


def test_image_views_are_per_image_and_replayable():
    """The image augmenter's views: view 0 is the image itself (image.train.epoch_augment off),
    the copies are warps drawn per image, the same alone or in a batch, new every epoch, and
    torch's RNG is left alone."""
    pixels = torch.zeros(6, 1, 32, 32, dtype=torch.uint8)
    pixels[:, :, 8:24, 12:20] = 255
    prep = Preprocessing(image_size=32, channels=1, mean=[0.5], std=[0.25])
    params = load_params(REPO / "params.yaml")
    views = image_augment.augmenter(params, prep, REPO)
    keys = item_keys([f"images/train/a/{i}.png" for i in range(6)])
    before = torch.get_rng_state()
    first = views.view(pixels, keys, 1, 1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(views.view(pixels, keys, 0 + 1, 0), pixels)
    assert torch.equal(first, views.view(pixels, keys, 1, 1))
    assert torch.equal(first[2:3], views.view(pixels[2:3], keys[2:3], 1, 1))  # alone
    assert not torch.equal(first, views.view(pixels, keys, 2, 1))  # another epoch
    assert not torch.equal(first, views.view(pixels, keys, 1, 2))  # another copy
    assert not torch.equal(first[0], first[1])
    assert (first != pixels).flatten(1).any(1).all()  # every image moved
    x = views.to_input(first)
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(prep.normalize(first.numpy())), atol=1e-6)


def test_steps_per_epoch_skip_tails_smaller_than_the_world(tmp_path):
    data = tensors(tmp_path, torch.zeros(257, 1), torch.zeros(257, dtype=torch.int64))[0]
    assert (data.steps(128, 1), data.steps(128, 2), data.steps(257, 2)) == (3, 2, 1)
    assert [len(y) for _, y in data.batches(1, 128, 0, 0, 2)] == [64, 64]  # rank 0's halves
    assert [len(y) for _, y in data.batches(1, 128)] == [128, 128, 1]


def test_outputs_replace_the_old_folder_whole(tmp_path):
    out = tmp_path / "float"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    params = load_params(REPO / "params.yaml")
    card = ModelCard(architecture="lenet5", classes=["a", "b"],
                     preprocessing=Preprocessing(image_size=32, channels=1, mean=[0.5], std=[0.25]),
                     data_hash="0" * 64,
                     recipe=Recipe(data=params.data, train=params.train, compress=None,
                                   section=recipe_section(params)),
                     weights={}, val=ValScore(loss=0.1, accuracy=0.9), selection=None)
    train.write_outputs(out, {"w": torch.ones(2)}, card, {})
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert read_card(out).weights == {"model.safetensors": sha256_file(out / "model.safetensors")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_with_bf16_autocast(tmp_path):
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 2, 256)).cuda()
    x = torch.randn(256, 1, 32, 32, device="cuda") * 0.3
    x[:, :, :, :16] += 1.5 * (y == 0).float().view(-1, 1, 1, 1)
    x[:, :, :, 16:] += 1.5 * (y == 1).float().view(-1, 1, 1, 1)
    torch.manual_seed(0)
    model = image_models.build("lenet5", channels=1, classes=2, image_size=32).cuda()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    data, val = tensors(tmp_path, x, y, device="cuda")
    metrics = training.fit(model, data, epochs=3, batch_size=32, optimizer=optimizer,
                           scheduler=training.make_schedule("onecycle", optimizer, 2e-3, 3 * 8),
                           label_smoothing=0.0, memory_format=torch.channels_last,
                           val=val, cuda_graph=False)
    assert metrics["val_acc"] > 0.95


def digit_halves(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes a LeNet-5 separates in a few epochs: bright left or right image halves."""
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 2, n)).to(device)
    x = torch.from_numpy(rng.normal(0, 0.3, (n, 1, 32, 32)).astype(np.float32)).to(device)
    x[:, :, :, :16] += 1.5 * (y == 0).float().view(-1, 1, 1, 1)
    x[:, :, :, 16:] += 1.5 * (y == 1).float().view(-1, 1, 1, 1)
    return x, y


def fit_lenet(folder: Path, x: torch.Tensor, y: torch.Tensor, cuda_graph: bool
              ) -> tuple[dict, dict]:
    """(last epoch's metrics, weights) of 3 epochs at batch 64 with params.yaml's recipe."""
    data, val = tensors(folder, x.cpu(), y.cpu(), device=x.device.type)
    torch.manual_seed(0)
    model = image_models.build("lenet5", channels=1, classes=2, image_size=32).to(x.device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = training.make_optimizer("adam", model.parameters(), 2e-3, 0.9, 0.0)
    steps = 3 * data.steps(64)
    metrics = training.fit(model, data, epochs=3, batch_size=64, optimizer=optimizer,
                           scheduler=training.make_schedule("onecycle", optimizer, 2e-3, steps),
                           label_smoothing=0.1, memory_format=torch.channels_last,
                           val=val, cuda_graph=cuda_graph)
    return metrics, {k: v.float().cpu() for k, v in model.state_dict().items()}


def test_cuda_graph_flag_leaves_cpu_training_unchanged(tmp_path):
    x, y = digit_halves(96, "cpu")  # one full batch of 64 and a tail of 32
    eager = fit_lenet(tmp_path / "eager", x, y, cuda_graph=False)
    graph = fit_lenet(tmp_path / "graph", x, y, cuda_graph=True)
    assert eager[0]["train_loss"] == graph[0]["train_loss"]
    assert all(torch.equal(eager[1][k], graph[1][k]) for k in eager[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_train_like_eager_steps(monkeypatch, tmp_path):
    """200 samples at batch 64: three captured-graph steps and an eager tail step per epoch."""
    captures = []
    make = torch.cuda.make_graphed_callables
    monkeypatch.setattr(torch.cuda, "make_graphed_callables",
                        lambda *a, **k: captures.append(a) or make(*a, **k))
    x, y = digit_halves(200, "cuda")
    eager = fit_lenet(tmp_path / "eager", x, y, cuda_graph=False)
    assert not captures
    graph = fit_lenet(tmp_path / "graph", x, y, cuda_graph=True)
    assert len(captures) == 1
    assert graph[0]["val_acc"] > 0.95
    assert abs(graph[0]["train_loss"] - eager[0]["train_loss"]) < 1e-3
    for key, weights in eager[1].items():
        torch.testing.assert_close(graph[1][key], weights, rtol=1e-2, atol=1e-3)
