"""Stage 7: put the selected model into the BentoML model store and build the Bento.

The model (model.onnx + model.json, as evaluate selected it) is saved as `kiln-classifier`,
labelled with its variant, accuracy, macro F1 and the git revision; the Bento is built from
bentofile.yaml and picks that model up through the service's class-level BentoModel.
Writes {"model_tag", "bento_tag"} to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from pipeline import StageError

REPO = Path(__file__).resolve().parent.parent
# Before bentoml is imported (it reads these at import): keep its store inside the project and
# stop its usage tracking, also when a stage runs through `dvc repro` without make.
os.environ.setdefault("BENTOML_HOME", str(REPO / ".bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402

from pipeline.service import MODEL_NAME  # noqa: E402

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


def package(model_dir: Path, bentofile: Path) -> tuple[str, str]:
    """Save the model into the store, build the Bento; return (model tag, Bento tag)."""
    card = read_card(model_dir)
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
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as model:
        for name in MODEL_FILES:
            shutil.copyfile(model_dir / name, model.path_of(name))
    bento = bentoml.bentos.build_bentofile(str(bentofile),
                                           build_ctx=str(bentofile.resolve().parent))
    return str(model.tag), str(bento.tag)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline package")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bentofile", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model_tag, bento_tag = package(args.model, args.bentofile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model_tag": model_tag, "bento_tag": bento_tag}, indent=1) + "\n")
    print(f"package: model {model_tag}, Bento {bento_tag}")
    print(f"package: serve it with `BENTOML_HOME={os.environ['BENTOML_HOME']} "
          f"bentoml serve {bento_tag}` (binds 127.0.0.1:3000)")
