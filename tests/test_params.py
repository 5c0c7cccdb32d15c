"""params.yaml loads into typed params; bad values are rejected with the key named."""
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
    assert isinstance(params.gate.min_accuracy, float)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["train"].update(epoch=3), "params.yaml: train.epoch: unknown key"),
    (lambda r: r.update(extra={}), "params.yaml: extra: unknown key"),
    (lambda r: r["train"].update(epochs="ten"), "train.epochs: expected int, got str 'ten'"),
    (lambda r: r["train"].update(epochs=True), "train.epochs: expected int, got bool"),
    (lambda r: r["augment"].update(hflip="no"), "augment.hflip: expected bool"),
    (lambda r: r["train"].update(optimizer="rmsprop"), "train.optimizer: expected one of ['adam', 'sgd']"),
    (lambda r: r["data"].update(channels=2), "data.channels: expected one of [1, 3]"),
    (lambda r: r["data"]["split"].update(test=0.5), "data.split: fractions must sum to 1"),
    (lambda r: r["gate"].pop("policy"), "gate.policy: missing key"),
    (lambda r: r["evaluate"].update(latency_batch_sizes=[1, "x"]),
     "evaluate.latency_batch_sizes[1]: expected int"),
    (lambda r: r["train"].update(epochs=0), "train.epochs: must be >= 1"),
])
def test_bad_params_name_the_key(tmp_path, edit, message):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, edit))
    assert message in str(e.value)


def test_int_accepted_where_float_expected(tmp_path):
    params = load_params(write(tmp_path, lambda r: r["train"].update(lr=1)))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_stage_cli_reports_bad_params(tmp_path):
    import subprocess, sys
    write(tmp_path, lambda r: r["data"].update(seed="x"))
    done = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--out", "out"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "kiln ingest: error: params.yaml: data.seed: expected int" in done.stderr
    assert not (tmp_path / "out").exists()
