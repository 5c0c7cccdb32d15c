"""params.yaml loads into typed params; bad values are rejected with the key named."""
import functools
import re
from pathlib import Path

import pytest
import yaml

from pipeline.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.image.train.model == "lenet5"
    assert params.gate.min_accuracy is None  # relative to the baselines by default
    assert isinstance(params.gate.baseline_margin, float)


def image(sub: str, **values):
    """An edit of params.yaml's image.<sub>."""
    return lambda r: r["image"][sub].update(values)


@pytest.mark.parametrize("edit, message", [
    (image("train", max_epoch=3),
     "params.yaml: image.train.max_epoch: unknown key (did you mean 'max_epochs'?)"),
    (lambda r: r.update(extra={}), "params.yaml: extra: unknown section (allowed: data, ingest,"),
    # DVC reruns only stages whose listed params changed: with `train:` kept, a misspelt copy
    # beside it is seen only because the loader reads every section
    (lambda r: r.update(trian=r["train"]),
     "params.yaml: trian: unknown section (did you mean 'train'?)"),
    (image("train", model="lenet6"),
     "image.train.model: expected one of ['lenet5', 'resnet_small'], got 'lenet6' (did you mean 'lenet5'?)"),
    (lambda r: r["compress"].update(prune_method="structured_l2"),
     "compress.prune_method: expected one of ['structured_l1', 'l1_unstructured', 'l1_channels'], "
     "got 'structured_l2' (did you mean 'structured_l1'?)"),
    (image("preprocess", background=256), "image.preprocess.background: must be a gray level 0..255"),
    (image("preprocess", background=[0, 0]), "image.preprocess.background: must be a gray level"),
    (image("preprocess", background=None), "image.preprocess.background: must be a gray level"),
    (image("preprocess", background="black"),
     "image.preprocess.background: expected int or list[int], got str 'black'"),
    (lambda r: r["ingest"].update(max_file_bytes=0), "ingest.max_file_bytes: must be >= 1"),
    (image("train", max_epochs="ten"), "image.train.max_epochs: expected int, got str 'ten'"),
    (image("train", max_epochs=True), "image.train.max_epochs: expected int, got bool"),
    (image("augment", hflip="no"), "image.augment.hflip: expected bool"),
    (lambda r: r["train"].update(optimizer="rmsprop"), "train.optimizer: expected one of ['adam', 'sgd']"),
    (image("preprocess", channels=2), "image.preprocess.channels: expected one of [1, 3]"),
    (lambda r: r["data"]["split"].update(test=0.5), "data.split: fractions must sum to 1"),
    (lambda r: r["gate"].pop("policy"), "gate.policy: missing key"),
    (lambda r: r["evaluate"].update(latency_batch_sizes=[1, "x"]),
     "evaluate.latency_batch_sizes[1]: expected int"),
    (image("train", max_epochs=0), "image.train.max_epochs: must be >= 1"),
    (lambda r: r["train"].update(patience=0), "train.patience: must be >= 1 (epochs)"),
    (lambda r: r["train"].update(monitor="val_f1"),
     "train.monitor: expected one of ['val_loss', 'val_acc'], got 'val_f1'"),
    (lambda r: r["validate"].update(min_items=0), "validate.min_items: must satisfy 1 <="),
    # a modality not in use is checked too: its section is in the same file
    (lambda r: r["audio"]["train"].update(n_mels=500),
     "audio.train.n_mels: must be in [1, audio.train.n_fft / 2 + 1]"),
    (lambda r: r["ingest"].update(split_column="label"),
     "ingest.label_column: item_column, label_column and split_column must name three"),
    # keys from before the modality sections: refused with where they live now, never ignored
    (lambda r: r["train"].update(max_epochs=30), "train.max_epochs: unknown key (each "
     "modality's own now: audio.train.max_epochs, image.train.max_epochs, text.train.max_epochs)"),
    (lambda r: r["data"].update(image_size=32),
     "data.image_size: unknown key (each modality's own now: image.preprocess.image_size)"),
    (lambda r: r.update(augment={"copies": 2}), "augment: unknown section (each modality's own "
     "now: audio.augment, image.augment, text.augment)"),
    (lambda r: r["text"].update(max_epochs=5),
     "text.max_epochs: unknown key (each modality's own now: audio.train.max_epochs,"),
    # the keys before early stopping and one gate for every modality: refused, never ignored
    (image("train", epochs=30), "image.train.epochs: unknown key (did you mean 'max_epochs'?)"),
    (lambda r: r["text"].update(min_accuracy=0.85), "text.min_accuracy: unknown key"),
    (lambda r: r["gate"].update(min_accuracy=1.5),
     "gate.min_accuracy: must be in [0, 1], or null for no absolute floor"),
])
def test_bad_params_name_the_key(tmp_path, edit, message):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, edit))
    assert message in str(e.value)


def test_an_absolute_gate_floor_is_optional(tmp_path):
    params = load_params(write(tmp_path, lambda r: r["gate"].update(min_accuracy=0.9)))
    assert params.gate.min_accuracy == 0.9


def test_int_accepted_where_float_expected(tmp_path):
    params = load_params(write(tmp_path, image("train", lr=1)))
    assert params.image.train.lr == 1.0 and isinstance(params.image.train.lr, float)


def test_background_takes_a_gray_level_or_rgb(tmp_path):
    assert load_params(write(tmp_path, image("preprocess", background=[0, 128, 255]))
                       ).image.preprocess.background == [0, 128, 255]
    assert load_params(REPO / "params.yaml").image.preprocess.background == 0


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["data"].update(seed="x"), "params.yaml: data.seed: expected int, got str 'x'"),
    # a section ingest does not read: every stage checks the whole file
    (image("train", model="lenet6"), "params.yaml: image.train.model: expected one of "
     "['lenet5', 'resnet_small'], got 'lenet6' (did you mean 'lenet5'?)"),
])
def test_stage_cli_reports_bad_params(tmp_path, edit, message):
    import subprocess, sys
    write(tmp_path, edit)
    done = subprocess.run([sys.executable, "-m", "pipeline.stages", "ingest", "--out", "out"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr == f"kiln ingest: error: {message}\n"  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_the_overrides_kiln_suggests_name_real_keys(tmp_path):
    """Every `-S key=value` that the README or the run summary tells a user to type loads: a
    renamed key (train.epochs became image.train.max_epochs) must not live on in the advice."""
    texts = [REPO / "README.md", *sorted((REPO / "flows").glob("*.py"))]
    overrides = {m for path in texts
                 for m in re.findall(r"-S ([a-z_.]+)=([^\s`'\"]+)", path.read_text())}
    assert ("train.seed", "1") in overrides  # the summary's Next line
    for key, value in overrides:
        *sections, name = key.split(".")
        load_params(write(tmp_path, lambda r: functools.reduce(dict.__getitem__, sections, r)
                          .__setitem__(name, yaml.safe_load(value))))
