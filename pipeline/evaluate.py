"""Stage 6: evaluate every variant on the test split, gate them and select the one to serve.

Variants: the float torch model (the reference, not servable: the server runs ONNX Runtime)
and the ONNX files from compress. A variant is eligible when its accuracy is at least
gate.min_accuracy and within gate.max_accuracy_drop of the float torch model; gate.policy picks
one of the eligible. The chosen one goes to --out as model.onnx + model.json for packaging.
None eligible: the metrics are still written, the stage fails and nothing is packaged.
An ineligible variant (e.g. int8 losing more than gate.max_accuracy_drop) is reported with the
reason in `why_not`, and the policy falls back to the best eligible one.

The trade-off report: per variant accuracy, macro F1, file size, MACs and parameters (counted
by compress, see pipeline/compress.py) and latency per evaluate.latency_batch_sizes (median of
evaluate.latency_runs timed calls after 3 warm-up calls, evaluate.threads threads, one process,
in-process call: no HTTP). --plots gets tradeoff.csv for DVC's accuracy-vs-size/latency plots.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from pipeline import StageError, models
from pipeline.ingest import load_split
from pipeline.params import EvaluateParams, GateParams, load_params
from pipeline.preprocess import Preprocessing

Predict = Callable[[np.ndarray], np.ndarray]  # float32 (N, C, S, S) -> logits (N, classes)


@dataclass(frozen=True)
class Variant:
    name: str
    file: Path
    servable: bool       # the server runs ONNX Runtime, so only ONNX files can be served
    predict: Predict
    compressed_as: str   # its entry in compress.json (MACs and parameters)


def torch_predictor(model: torch.nn.Module) -> Predict:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return predict


def onnx_predictor(path: Path, threads: int) -> Predict:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"input": x})[0]


def load_variants(float_dir: Path, compressed_dir: Path, threads: int) -> list[Variant]:
    torch.set_num_threads(threads)
    model, _ = models.load(float_dir)
    variants = [Variant("float_torch", float_dir / "model.safetensors", False,
                        torch_predictor(model), "float.onnx")]
    for name, file in (("float_onnx", "float.onnx"), ("pruned_onnx", "pruned.onnx"),
                       ("int8_onnx", "int8.onnx")):
        path = compressed_dir / file
        if not path.exists():
            raise StageError(f"{path}: missing; run the compress stage first")
        variants.append(Variant(name, path, True, onnx_predictor(path, threads), file))
    return variants


def median_latency_ms(predict: Predict, x: np.ndarray, batch_size: int, runs: int) -> float:
    """Median wall time of one predict call on `batch_size` images, after 3 warm-up calls."""
    batch = np.resize(x, (batch_size, *x.shape[1:]))  # repeats test images if too few
    for _ in range(3):
        predict(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(variant: Variant, x: np.ndarray, y: np.ndarray, classes: list[str],
            p: EvaluateParams, counts: dict) -> tuple[dict, np.ndarray]:
    """Metrics of one variant; `counts` is compress.json (its "macs" and "params" per file)."""
    predicted = np.concatenate([variant.predict(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1)
    precision, recall, _, _ = precision_recall_fscore_support(
        y, predicted, labels=range(len(classes)), zero_division=0)
    metrics = {
        "accuracy": round(float(accuracy_score(y, predicted)), 5),
        "macro_f1": round(float(f1_score(y, predicted, average="macro")), 5),
        "size_bytes": variant.file.stat().st_size,
        "macs": counts["macs"][variant.compressed_as],
        "params": counts["params"][variant.compressed_as],
        **{f"latency_ms_b{b}": round(median_latency_ms(variant.predict, x, b, p.latency_runs), 4)
           for b in p.latency_batch_sizes},
        "servable": variant.servable,
        "per_class": {c: {"precision": round(float(pr), 4), "recall": round(float(rc), 4)}
                      for c, pr, rc in zip(classes, precision, recall)},
    }
    return metrics, predicted


def gate(results: dict[str, dict], g: GateParams) -> str | None:
    """Mark each variant eligible or not; return the one gate.policy selects, or None."""
    floor = max(g.min_accuracy, results["float_torch"]["accuracy"] - g.max_accuracy_drop)
    for m in results.values():
        m["eligible"] = m["servable"] and m["accuracy"] >= floor - 1e-9
        if not m["servable"]:
            m["why_not"] = "not servable (the server runs ONNX Runtime)"
        elif not m["eligible"]:
            m["why_not"] = (f"accuracy {m['accuracy']:.4f} below {floor:.4f} = max(gate.min_accuracy, "
                            "float_torch accuracy - gate.max_accuracy_drop)")
    eligible = [name for name, m in results.items() if m["eligible"]]
    if not eligible:
        return None
    rank = {
        "smallest": lambda n: (results[n]["size_bytes"], -results[n]["accuracy"]),
        "most_accurate": lambda n: (-results[n]["accuracy"], results[n]["size_bytes"]),
        "fastest": lambda n: (min(v for k, v in results[n].items() if k.startswith("latency_ms_b")),
                              -results[n]["accuracy"]),
    }[g.policy]
    return min(eligible, key=rank)


def write_tradeoff(results: dict[str, dict], path: Path) -> None:
    """One row per variant for DVC's scatter plots: accuracy against size (kB) and latency."""
    latency_keys = sorted((k for k in next(iter(results.values())) if k.startswith("latency_ms_b")),
                          key=lambda k: int(k.removeprefix("latency_ms_b")))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "accuracy", "macro_f1", "size_kb", "macs", *latency_keys])
        for name, m in results.items():
            writer.writerow([name, m["accuracy"], m["macro_f1"], round(m["size_bytes"] / 1000, 1),
                             m["macs"], *(m[k] for k in latency_keys)])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline evaluate")
    parser.add_argument("--model", type=Path, required=True, help="float model folder")
    parser.add_argument("--compressed", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (test split)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the selected variant")
    args = parser.parse_args(argv)
    params = load_params()

    info = json.loads((args.model / "model.json").read_text())
    prep = Preprocessing.from_dict(info["preprocessing"])
    pixels, y = load_split(args.data, "test", prep)
    x = prep.normalize(pixels)
    results, predictions = {}, {}
    counts = json.loads((args.compressed / "compress.json").read_text())
    if "macs" not in counts or "params" not in counts:
        raise StageError(f"{args.compressed / 'compress.json'}: no 'macs'/'params' counts; "
                         "rerun the compress stage")
    variants = load_variants(args.model, args.compressed, params.evaluate.threads)
    for variant in variants:
        results[variant.name], predictions[variant.name] = measure(
            variant, x, y, info["classes"], params.evaluate, counts)
    selected = gate(results, params.gate)

    report = {"test_images": len(y), "selected": selected,
              "gate": {"min_accuracy": params.gate.min_accuracy,
                       "max_accuracy_drop": params.gate.max_accuracy_drop,
                       "policy": params.gate.policy},
              "variants": results}
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(report, indent=1) + "\n")
    args.plots.mkdir(parents=True, exist_ok=True)
    with open(args.plots / "confusion.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        shown = predictions[selected or "float_torch"]
        writer.writerows((info["classes"][a], info["classes"][b]) for a, b in zip(y, shown))
    write_tradeoff(results, args.plots / "tradeoff.csv")

    for name, m in results.items():
        print(f"evaluate: {name:12s} acc {m['accuracy']:.4f}  f1 {m['macro_f1']:.4f}  "
              f"{m['size_bytes']:>8,d} B  {m['macs']:>8,d} MACs  "
              f"b1 {m.get('latency_ms_b1', float('nan')):.3f} ms  "
              f"{'eligible' if m['eligible'] else m['why_not']}")
    if selected is None:
        reasons = "; ".join(f"{n} accuracy {m['accuracy']:.4f}" for n, m in results.items())
        raise StageError(f"gate: no variant is eligible (needs accuracy >= gate.min_accuracy "
                         f"{params.gate.min_accuracy} and within gate.max_accuracy_drop "
                         f"{params.gate.max_accuracy_drop} of float_torch): {reasons}; "
                         "nothing will be packaged")

    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(next(v.file for v in variants if v.name == selected), args.out / "model.onnx")
    served = {k: v for k, v in results[selected].items() if k != "per_class"}
    (args.out / "model.json").write_text(json.dumps(
        {**info, "variant": selected, "metrics": served}, indent=1) + "\n")
    print(f"evaluate: selected {selected} by gate.policy={params.gate.policy} -> {args.out}")
