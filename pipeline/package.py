"""Stage 7: champion and challenger, infra validation, promotion.

The selected model (model.onnx + model.json, as evaluate selected it) is the challenger; the
champion is the model whose Bento serves (`make serve`), named in the champion record
$BENTOML_HOME/kiln/champion.json together with the champions before it (`make rollback`).

1. Challenger and champion are scored on the same test split (--data, ONNX Runtime, each with
   the preprocessing in its own card). The challenger goes on only if its accuracy is at least
   the champion's minus package.champion_tolerance; with no champion yet, evaluate's gate
   thresholds were the whole bar. A worse challenger is not packaged: nothing enters the store,
   the champion keeps serving, the stage succeeds and --out says why ("promoted": false).
2. The challenger is saved as `kiln-classifier` (labelled with variant, accuracy, macro F1, git
   revision; its card gets the serving limits of params.yaml `serve`) and its Bento is built
   from bentofile.yaml.
3. Infra validation: the new Bento runs under `bentoml serve` on a free loopback port; once
   /readyz answers (within package.ready_timeout_s), every test image is posted as its file to
   /classify and all of them as one .npy to /classify_npy, and the served classes must equal
   the ones computed here from the same file. Any failure deletes the new Bento and model, leaves
   the champion in place and fails the stage.
4. Promotion: the record names the new champion; the previous one is kept for rollback.

Writes {"promoted", "reason", "model_tag", "bento_tag" (the champion's after this run),
"challenger", "champion_before", "infra_validation"} to --out.
Also `python -m pipeline package champion` (prints the champion's Bento tag) and
`python -m pipeline package rollback` (the previous champion serves again).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from pipeline import MODEL_NAME, StageError

REPO = Path(__file__).resolve().parent.parent
# Before bentoml is imported (it reads these at import): keep its store inside the project and
# stop its usage tracking, also when a stage runs through `dvc repro` without make.
os.environ.setdefault("BENTOML_HOME", str(REPO / ".bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from bentoml.exceptions import NotFound  # noqa: E402

from pipeline.drift import REFERENCE_FILE  # noqa: E402
from pipeline.ingest import load_split, read_manifest  # noqa: E402
from pipeline.params import PackageParams, ServeParams, load_params  # noqa: E402
from pipeline.preprocess import Preprocessing  # noqa: E402

MODEL_FILES = ("model.onnx", "model.json")


def git_revision(folder: Path) -> str:
    """Short commit hash of the checkout holding `folder`; "unknown" outside git or before the
    first commit."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder,
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:  # git not installed
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _without_none(value):
    """BentoML metadata rejects None; drop those entries (model.json keeps the full record)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


def read_card(model_dir: Path) -> dict:
    for name in MODEL_FILES:
        if not (model_dir / name).is_file():
            raise StageError(f"{model_dir / name}: missing; package needs model.onnx and model.json "
                             "(written by the evaluate stage)")
    try:
        card = json.loads((model_dir / "model.json").read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{model_dir / 'model.json'}: not valid JSON ({e})") from e
    for key in ("variant", "classes", "preprocessing", "metrics"):
        if key not in card:
            raise StageError(f"{model_dir / 'model.json'}: missing key '{key}'")
    for key in ("accuracy", "macro_f1"):
        if not isinstance(card["metrics"].get(key), (int, float)):
            raise StageError(f"{model_dir / 'model.json'}: metrics.{key} missing or not a number")
    return card


def build_bento(model_dir: Path, bentofile: Path, serving: ServeParams,
                reference: Path | None) -> tuple[str, str]:
    """Save the model into the store, build the Bento; return (model tag, Bento tag).

    `reference`: the validate stage's data profile, stored in the model as drift.REFERENCE_FILE
    so the next run's validate can compare its data with this champion's (pipeline/drift.py).
    """
    card = read_card(model_dir)
    if reference is not None and not reference.is_file():
        raise StageError(f"{reference}: data profile not found (written by the validate stage)")
    if not bentofile.is_file():
        raise StageError(f"{bentofile}: bentofile not found")
    # Label values must be strings (BentoML); metrics to 4 decimals keep them short and readable.
    labels = {
        "variant": str(card["variant"]),
        "accuracy": f"{card['metrics']['accuracy']:.4f}",
        "macro_f1": f"{card['metrics']['macro_f1']:.4f}",
        "git": git_revision(bentofile.resolve().parent),
    }
    metadata = _without_none({
        "model": card.get("model"),
        "variant": card["variant"],
        "classes": card["classes"],
        "preprocessing": card["preprocessing"],
        "data_hash": card.get("data_hash"),
        "metrics": card["metrics"],
    })
    # The server reads its settings (params.yaml serve) from the card it serves (pipeline/service.py).
    served_card = {**card, "serving": dataclasses.asdict(serving)}
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as model:
        shutil.copyfile(model_dir / "model.onnx", model.path_of("model.onnx"))
        Path(model.path_of("model.json")).write_text(json.dumps(served_card, indent=1) + "\n")
        if reference is not None:
            shutil.copyfile(reference, model.path_of(REFERENCE_FILE))
    try:
        bento = bentoml.bentos.build_bentofile(str(bentofile),
                                               build_ctx=str(bentofile.resolve().parent))
    except Exception:
        bentoml.models.delete(model.tag)  # no half-packaged model left as :latest
        raise
    return str(model.tag), str(bento.tag)


# ---- the champion record -----------------------------------------------------------------

def champion_record_path() -> Path:
    return Path(os.environ["BENTOML_HOME"]) / "kiln" / "champion.json"


def read_champion_record() -> dict:
    """{"champion": {...} or None, "previous": [older champions, oldest first]}."""
    path = champion_record_path()
    if not path.exists():
        return {"champion": None, "previous": []}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: champion record is not valid JSON ({e})") from e
    for key in ("champion", "previous"):
        if key not in record:
            raise StageError(f"{path}: champion record has no key '{key}'")
    return record


def write_champion_record(record: dict) -> None:
    path = champion_record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)  # atomic: a crash never leaves half a record


def champion() -> dict | None:
    """The serving champion: {"model_tag", "bento_tag", "accuracy", "promoted_at"}, or None."""
    return read_champion_record()["champion"]


def rollback() -> dict:
    """Make the previous champion the champion again; return it. The rolled-back one is dropped
    from the record (its Bento and model stay in the store)."""
    record = read_champion_record()
    if not record["previous"]:
        raise StageError(f"{champion_record_path()}: no previous champion to roll back to")
    previous = record["previous"][-1]
    try:
        bentoml.bentos.get(previous["bento_tag"])
    except NotFound:
        raise StageError(f"previous champion's Bento {previous['bento_tag']} is no longer in the "
                         f"store {os.environ['BENTOML_HOME']}; nothing changed") from None
    write_champion_record({"champion": previous, "previous": record["previous"][:-1]})
    return previous


# ---- scoring on the test split ---------------------------------------------------------------

def predict_classes(model_onnx: Path, prep: Preprocessing, pixels: np.ndarray) -> np.ndarray:
    """Class index per image, by ONNX Runtime on the CPU, as the server computes it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    x = prep.normalize(pixels)
    return np.concatenate([session.run(["logits"], {"input": x[i:i + 256]})[0].argmax(1)
                           for i in range(0, len(x), 256)])


def accuracy_on_test_split(model_onnx: Path, card: dict, data_dir: Path) -> float:
    prep = Preprocessing.from_dict(card["preprocessing"])
    pixels, labels = load_split(data_dir, "test", prep)
    return float((predict_classes(model_onnx, prep, pixels) == labels).mean())


# ---- infra validation ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(bento_tag: str, log: Path, ready_timeout_s: float,
            host: str | None = "127.0.0.1") -> Iterator[httpx.Client]:
    """`bentoml serve <bento_tag>` on a free loopback port of this machine, in its own process
    group; yields a client once /readyz answers 200, stops the whole group after.
    host=None passes no --host, so the Bento's own config decides (it says 127.0.0.1)."""
    port = free_port()
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", bento_tag, "--port", str(port),
             *(["--host", host] if host else [])],
            cwd=log.parent, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise StageError(f"infra validation: `bentoml serve {bento_tag}` exited with code "
                                 f"{process.returncode} before it was ready:\n{_tail(log)}")
            # BentoML's arbiter restarts a worker whose startup failed, forever: fail fast.
            if "Application startup failed" in log.read_text(errors="replace"):
                raise StageError(f"infra validation: {bento_tag} failed to start before it was "
                                 f"ready:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise StageError(f"infra validation: {bento_tag} not ready after "
                                 f"package.ready_timeout_s = {ready_timeout_s} s:\n{_tail(log)}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def infra_validate(bento_tag: str, model_dir: Path, data_dir: Path, ready_timeout_s: float) -> dict:
    """Serve the Bento and check it answers every test image as model_dir's model does here.
    Raises StageError naming the first differences; returns what was checked."""
    card = read_card(model_dir)
    prep = Preprocessing.from_dict(card["preprocessing"])
    rows = [r for r in read_manifest(data_dir)[0] if r["split"] == "test"]
    pixels, _ = load_split(data_dir, "test", prep)
    expected = predict_classes(model_dir / "model.onnx", prep, pixels)
    with tempfile.TemporaryDirectory() as tmp, \
            serving(bento_tag, Path(tmp, "serve.log"), ready_timeout_s) as client:
        served, start = [], time.perf_counter()
        for row in rows:
            response = client.post("/classify", files={
                "image": (Path(row["path"]).name, (data_dir / row["path"]).read_bytes())})
            if response.status_code != 200:
                raise StageError(f"infra validation: /classify answered {response.status_code} "
                                 f"for {data_dir / row['path']}: {response.text[:300]}")
            served.append(response.json()["index"])
        seconds = time.perf_counter() - start
        buffer = io.BytesIO()
        np.save(buffer, pixels)
        response = client.post("/classify_npy", files={"array": ("test.npy", buffer.getvalue())})
        if response.status_code != 200:
            raise StageError(f"infra validation: /classify_npy answered {response.status_code}: "
                             f"{response.text[:300]}")
        served_batch = [p["index"] for p in response.json()]
    for endpoint, answers in (("/classify", served), ("/classify_npy", served_batch)):
        wrong = [(rows[i]["path"], int(e), a) for i, (e, a) in enumerate(zip(expected, answers))
                 if e != a]
        if wrong or len(answers) != len(expected):
            raise StageError(f"infra validation: {endpoint} of {bento_tag} differs from the "
                             f"evaluated model on {len(wrong)} of {len(expected)} test images "
                             f"(got {len(answers)} answers); first (image, expected, served): "
                             f"{wrong[:5]}")
    return {"bento_tag": bento_tag, "test_images": len(rows), "endpoints": ["/classify", "/classify_npy"],
            "classify_ms_mean": round(seconds / len(rows) * 1e3, 3)}


# ---- the stage -------------------------------------------------------------------------------

def package(model_dir: Path, bentofile: Path, data_dir: Path, p: PackageParams,
            serving_params: ServeParams, reference: Path | None) -> dict:
    """Steps 1-4 of the module doc; returns the --out report."""
    card = read_card(model_dir)
    challenger = {"variant": card["variant"],
                  "accuracy": accuracy_on_test_split(model_dir / "model.onnx", card, data_dir)}
    record = read_champion_record()
    current = record["champion"]
    if current is not None:
        try:
            stored = bentoml.models.get(current["model_tag"])
        except NotFound:
            raise StageError(f"champion model {current['model_tag']} (record "
                             f"{champion_record_path()}) is missing from the BentoML store; "
                             "restore it or remove the record") from None
        stored_card = json.loads(Path(stored.path_of("model.json")).read_text())
        current = {**current, "accuracy_now": accuracy_on_test_split(
            Path(stored.path_of("model.onnx")), stored_card, data_dir)}
        floor = current["accuracy_now"] - p.champion_tolerance
        if challenger["accuracy"] < floor - 1e-9:
            return {"promoted": False,
                    "reason": (f"challenger test accuracy {challenger['accuracy']:.4f} < champion "
                               f"{current['accuracy_now']:.4f} - package.champion_tolerance "
                               f"{p.champion_tolerance}; the champion keeps serving"),
                    "model_tag": current["model_tag"], "bento_tag": current["bento_tag"],
                    "challenger": challenger, "champion_before": current, "infra_validation": None}

    model_tag, bento_tag = build_bento(model_dir, bentofile, serving_params, reference)
    challenger["model_tag"], challenger["bento_tag"] = model_tag, bento_tag
    try:
        checked = infra_validate(bento_tag, model_dir, data_dir, p.ready_timeout_s)
    except BaseException:
        bentoml.bentos.delete(bento_tag)
        bentoml.models.delete(model_tag)
        raise

    promoted = {"model_tag": model_tag, "bento_tag": bento_tag,
                "accuracy": challenger["accuracy"],
                "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    previous = record["previous"] + ([record["champion"]] if record["champion"] else [])
    write_champion_record({"champion": promoted, "previous": previous})
    reason = ("first champion (evaluate's gate thresholds only)" if current is None else
              f"challenger test accuracy {challenger['accuracy']:.4f} >= champion "
              f"{current['accuracy_now']:.4f} - package.champion_tolerance {p.champion_tolerance}")
    return {"promoted": True, "reason": reason, "model_tag": model_tag, "bento_tag": bento_tag,
            "challenger": challenger, "champion_before": current, "infra_validation": checked}


def main(argv: list[str]) -> None:
    if argv[:1] == ["champion"]:
        current = champion()
        if current is None:
            raise StageError(f"{champion_record_path()}: no champion yet; run the pipeline first")
        print(current["bento_tag"])
        return
    if argv[:1] == ["rollback"]:
        restored = rollback()
        print(f"package: rolled back; champion is {restored['model_tag']} "
              f"(Bento {restored['bento_tag']}, test accuracy {restored['accuracy']:.4f})")
        return
    parser = argparse.ArgumentParser(
        prog="python -m pipeline package",
        epilog="also: `python -m pipeline package champion` | `python -m pipeline package rollback`")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bentofile", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (test split)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", type=Path,
                        help="data profile of the training data (validate --profile), for drift")
    args = parser.parse_args(argv)
    params = load_params()
    report = package(args.model, args.bentofile, args.data, params.package, params.serve,
                     args.reference)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"package: {'promoted' if report['promoted'] else 'not promoted'}: {report['reason']}")
    print(f"package: champion model {report['model_tag']}, Bento {report['bento_tag']}; serve it "
          f"with `make serve` or `BENTOML_HOME={os.environ['BENTOML_HOME']} bentoml serve "
          f"{report['bento_tag']}` (binds 127.0.0.1:3000)")
