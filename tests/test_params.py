"""params.yaml loads into typed params; bad values are rejected with the key named."""
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
    assert params.train.model == "lenet5"
    assert params.gate.min_accuracy is None  # relative to the baselines by default
    assert isinstance(params.gate.baseline_margin, float)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["train"].update(max_epoch=3),
     "params.yaml: train.max_epoch: unknown key (did you mean 'max_epochs'?)"),
    (lambda r: r.update(extra={}), "params.yaml: extra: unknown section (allowed: data, ingest,"),
    # DVC reruns only stages whose listed params changed: with `train:` kept, a misspelt copy
    # beside it is seen only because the loader reads every section
    (lambda r: r.update(trian=r["train"]),
     "params.yaml: trian: unknown section (did you mean 'train'?)"),
    (lambda r: r["train"].update(model="lenet6"),
     "train.model: expected one of ['lenet5', 'resnet_small'], got 'lenet6' (did you mean 'lenet5'?)"),
    (lambda r: r["compress"].update(prune_method="structured_l2"),
     "compress.prune_method: expected one of ['structured_l1', 'l1_unstructured', 'l1_channels'], "
     "got 'structured_l2' (did you mean 'structured_l1'?)"),
    (lambda r: r["data"].update(background=256), "data.background: must be a gray level 0..255"),
    (lambda r: r["data"].update(background=[0, 0]), "data.background: must be a gray level"),
    (lambda r: r["data"].update(background=None), "data.background: must be a gray level"),
    (lambda r: r["data"].update(background="black"), "data.background: expected int or list[int], got str 'black'"),
    (lambda r: r["ingest"].update(max_file_bytes=0), "ingest.max_file_bytes: must be >= 1"),
    (lambda r: r["train"].update(max_epochs="ten"), "train.max_epochs: expected int, got str 'ten'"),
    (lambda r: r["train"].update(max_epochs=True), "train.max_epochs: expected int, got bool"),
    (lambda r: r["augment"].update(hflip="no"), "augment.hflip: expected bool"),
    (lambda r: r["train"].update(optimizer="rmsprop"), "train.optimizer: expected one of ['adam', 'sgd']"),
    (lambda r: r["data"].update(channels=2), "data.channels: expected one of [1, 3]"),
    (lambda r: r["data"]["split"].update(test=0.5), "data.split: fractions must sum to 1"),
    (lambda r: r["gate"].pop("policy"), "gate.policy: missing key"),
    (lambda r: r["evaluate"].update(latency_batch_sizes=[1, "x"]),
     "evaluate.latency_batch_sizes[1]: expected int"),
    (lambda r: r["train"].update(max_epochs=0), "train.max_epochs: must be >= 1"),
    (lambda r: r["train"].update(patience=0), "train.patience: must be >= 1 (epochs)"),
    (lambda r: r["train"].update(monitor="val_f1"),
     "train.monitor: expected one of ['val_loss', 'val_acc'], got 'val_f1'"),
    # the keys before early stopping and one gate for every modality: refused, never ignored
    (lambda r: r["train"].update(epochs=30),
     "train.epochs: unknown key (did you mean 'max_epochs'?)"),
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
    params = load_params(write(tmp_path, lambda r: r["train"].update(lr=1)))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_background_takes_a_gray_level_or_rgb(tmp_path):
    assert load_params(write(tmp_path, lambda r: r["data"].update(background=[0, 128, 255]))
                       ).data.background == [0, 128, 255]
    assert load_params(REPO / "params.yaml").data.background == 0


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["data"].update(seed="x"), "params.yaml: data.seed: expected int, got str 'x'"),
    # a section ingest does not read: every stage checks the whole file
    (lambda r: r["train"].update(model="lenet6"), "params.yaml: train.model: expected one of "
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
    renamed key (train.epochs became train.max_epochs) must not live on in the advice."""
    texts = [REPO / "README.md", *sorted((REPO / "flows").glob("*.py"))]
    overrides = {m for path in texts
                 for m in re.findall(r"-S ([a-z_]+)\.([a-z_]+)=([^\s`'\"]+)", path.read_text())}
    assert ("train", "seed", "1") in overrides  # the summary's Next line
    for section, key, value in overrides:
        load_params(write(tmp_path, lambda r: r[section].__setitem__(key, yaml.safe_load(value))))
