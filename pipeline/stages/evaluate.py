"""Stage 6: evaluate every variant on the test split, gate them and select the one to serve.

Variants: the float torch model (the reference, not servable: the server runs ONNX Runtime),
the ONNX files from compress, and the baselines that can be served (pipeline/core/baselines.py).
The baselines, fitted on the train split by the model's scoring part, set the gate's bar: a
model variant is eligible when its accuracy is at least the best baseline's plus
gate.baseline_margin, at least gate.min_accuracy where that is set (null: no absolute floor),
and within gate.max_accuracy_drop of the float torch model. A servable baseline is eligible only
when it is more accurate than every model variant (and reaches gate.min_accuracy): then the
simpler model is the better one to serve. gate.policy picks one of the eligible. The chosen one
goes to --out as model.onnx + its card (model.json, with the selection) for packaging. None
eligible: the reports are still written, the stage fails naming the params key whose bar no
variant reached, and nothing is packaged. An ineligible variant (e.g. int8 losing more than
gate.max_accuracy_drop) is reported with the reason, and the policy falls back to the best
eligible one.

Written, each to the path given on the command line (dvc.yaml names them):
    --metrics    the selected variant; per variant: accuracy, macro F1, size (kB) and thousands
                 of MACs (counted by compress, see pipeline/stages/compress.py). The same on every run
                 with the same inputs.
    --latency    per batch size and variant, the median of evaluate.latency_runs timed calls per batch size of
                 evaluate.latency_batch_sizes, after 3 warm-up calls, evaluate.threads threads, in
                 process (no HTTP). Timing: it changes on every run.
    --details    every variant's measures with its eligibility and, if not eligible, why not;
                 per-class precision and recall; the gate's params
    --confusion  actual,predicted per test item for the selected variant (DVC confusion plot)
    --tradeoff   variant, accuracy, size_kb, macs: DVC's accuracy-vs-size and -vs-MACs plots
    --latency-plot  variant, accuracy and latencies: DVC's accuracy-vs-latency plot (timing)

The test split is read once, as a stream of batches (pipeline/core/dataset.py split_of: the items
as the card's preprocessing reads them), and each batch goes through every variant: a variant's
input is what the model's serving part makes of the items (model_input, as the server does: a
text model's own tokenizer, say), so no more than a batch of items is held. What else differs
per modality is the scoring part (pipeline/modalities/<modality>/scoring.py,
pipeline/core/modality.py Scoring): the baselines --metrics and --details report beside the
variants (every modality's majority class and a logistic regression: on an image's pixels, a
clip's log-mel statistics, a text's TF-IDF word unigrams). The files a model needs beside its
weights (a text model's tokenizer.json) go to --out with the selected variant.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from pipeline import StageError
from pipeline.core import saved_model
from pipeline.core.baselines import Baseline
from pipeline.core.card import (PREDICT_BATCH, ModelCard, Selection, ValScore, at_least,
                                onnx_predictor, read_card, sha256_file, write_card)
from pipeline.core.dataset import Items, split_of
from pipeline.core.modality import card_part, copy_model_files
from pipeline.params import EvaluateParams, GateParams, Params, load_params
from pipeline.core.progress import Progress

Predict = Callable[[np.ndarray], np.ndarray]  # model input (N, ...) -> logits (N, classes)


@dataclass(frozen=True)
class Variant:
    name: str
    file: Path
    servable: bool       # the server runs ONNX Runtime, so only ONNX files can be served
    predict: Predict
    model_input: Callable  # a batch of items -> its input (the serving part's model_input)
    macs: int            # per item (compress.json's count, or the baseline's)
    params: int
    card: ModelCard      # the card it is selected with


def torch_predictor(model: torch.nn.Module) -> Predict:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return predict


SUMMARY = {  # measure -> its value in --metrics, per variant
    "accuracy": lambda m: m["accuracy"], "macro_f1": lambda m: m["macro_f1"],
    "size_kb": lambda m: round(m["size_bytes"] / 1000, 1), "kmacs": lambda m: round(m["macs"] / 1000, 1)}
SELECTED_FILE = "model.onnx"  # the selected variant's name in --out, which package reads
ONNX_VARIANTS = {"float_onnx": "float.onnx", "pruned_onnx": "pruned.onnx", "int8_onnx": "int8.onnx"}


def model_input(folder: Path, card: ModelCard) -> Callable:
    """Items -> the input of the model in `folder`, as its serving part makes it."""
    return card_part(card, "serving").model_input(folder, card)


def load_variants(float_dir: Path, compressed_dir: Path, threads: int) -> list[Variant]:
    """The float torch model and the compressed ONNX files, every file checked against its
    card."""
    torch.set_num_threads(threads)
    model, float_card = saved_model.load(float_dir)
    card = read_card(compressed_dir)
    x = model_input(compressed_dir, card)
    (weights,) = float_card.weights
    counts = json.loads((compressed_dir / "compress.json").read_text())
    if "macs" not in counts or "params" not in counts:
        raise StageError(f"{compressed_dir / 'compress.json'}: no 'macs'/'params' counts; "
                         "rerun the compress stage")
    variants = [Variant("float_torch", float_dir / weights, False, torch_predictor(model), x,
                        counts["macs"]["float.onnx"], counts["params"]["float.onnx"], card)]
    for name, file in ONNX_VARIANTS.items():
        path = compressed_dir / file
        variants.append(Variant(name, path, True, onnx_predictor(path, threads), x,
                                counts["macs"][file], counts["params"][file], card))
    return variants


def baseline_variants(baselines: dict[str, Baseline], card: ModelCard, compressed_dir: Path,
                      folder: Path, threads: int) -> list[Variant]:
    """The servable baselines as variants: each exported into folder/<name>/ as model.onnx with
    the files the model's preprocessing names and its card (architecture: the baseline's name,
    which the serving part reads: a text baseline's input is the texts themselves)."""
    variants = []
    for name, b in baselines.items():
        if b.export is None:
            continue
        out = folder / name
        out.mkdir(parents=True)
        b.export(out / SELECTED_FILE)
        copy_model_files(card, compressed_dir, out)
        b_card = dataclasses.replace(card, architecture=name,
                                     weights={SELECTED_FILE: sha256_file(out / SELECTED_FILE)},
                                     val=ValScore(loss=b.val_loss, accuracy=b.val_accuracy))
        write_card(out, b_card)
        variants.append(Variant(name, out / SELECTED_FILE, True,
                                onnx_predictor(out / SELECTED_FILE, threads),
                                model_input(out, b_card), b.macs, b.params, b_card))
    return variants


def median_latency_ms(predict: Predict, x: np.ndarray, batch_size: int, runs: int) -> float:
    """Median wall time of one predict call on `batch_size` items, after 3 warm-up calls."""
    batch = np.resize(x, (batch_size, *x.shape[1:]))  # repeats test items if too few
    for _ in range(3):
        predict(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def test_logits(variants: list[Variant], test: Items) -> tuple[dict[str, np.ndarray], object]:
    """Each variant's logits (N, classes) on the test split, read once: every batch of items
    through every variant; and the first batch's items (latency is timed on them)."""
    logits: dict[str, list] = {v.name: [] for v in variants}
    first = None
    for items, _ in test.batches(PREDICT_BATCH):
        first = items if first is None else first
        for v in variants:
            logits[v.name].append(v.predict(v.model_input(items)))
    return {name: np.concatenate(parts) for name, parts in logits.items()}, first


def measure(variant: Variant, logits: np.ndarray, y: np.ndarray, sample, classes: list[str],
            p: EvaluateParams) -> tuple[dict, dict, dict, np.ndarray]:
    """(metrics, latency, per-class detail, predictions) of one variant from its test logits;
    latency timed on `sample` (the first batch of test items) as its input."""
    predicted = logits.argmax(1)
    precision, recall, _, _ = precision_recall_fscore_support(
        y, predicted, labels=range(len(classes)), zero_division=0)
    metrics = {
        "accuracy": round(float(accuracy_score(y, predicted)), 5),
        "macro_f1": round(float(f1_score(y, predicted, average="macro")), 5),
        "size_bytes": variant.file.stat().st_size,
        "macs": variant.macs,
        "params": variant.params,
    }
    x = variant.model_input(sample)
    latency = {f"latency_ms_b{b}": round(median_latency_ms(variant.predict, x, b, p.latency_runs), 4)
               for b in p.latency_batch_sizes}
    per_class = {c: {"precision": round(float(pr), 4), "recall": round(float(rc), 4)}
                 for c, pr, rc in zip(classes, precision, recall)}
    return metrics, latency, per_class, predicted


def model_floor(results: dict[str, dict], baselines: dict[str, dict], g: GateParams
                ) -> tuple[float, str, str]:
    """The bar a model variant's accuracy must reach, in words, and the params key that set it:
    the highest of the best baseline plus gate.baseline_margin, gate.min_accuracy where it is
    set, and the float torch model's accuracy less gate.max_accuracy_drop."""
    terms = []
    if baselines:
        best = max(baselines, key=lambda n: baselines[n]["accuracy"])
        terms.append((baselines[best]["accuracy"] + g.baseline_margin,
                      f"{best} {baselines[best]['accuracy']:.4f} + gate.baseline_margin "
                      f"{g.baseline_margin:g}", "gate.baseline_margin"))
    if g.min_accuracy is not None:
        terms.append((g.min_accuracy, f"gate.min_accuracy {g.min_accuracy:g}",
                      "gate.min_accuracy"))
    terms.append((results["float_torch"]["accuracy"] - g.max_accuracy_drop,
                  f"float_torch {results['float_torch']['accuracy']:.4f} - "
                  f"gate.max_accuracy_drop {g.max_accuracy_drop:g}", "gate.max_accuracy_drop"))
    return max(terms, key=lambda term: term[0])


def gate(results: dict[str, dict], servable: dict[str, bool], g: GateParams,
         latency: dict[str, dict], baselines: dict[str, dict]
         ) -> tuple[str | None, dict[str, str]]:
    """Mark each variant of `results` eligible or not (in place); return the one gate.policy
    selects (None when none is eligible) and, per ineligible variant, why not. `baselines` are
    the baselines' reports (accuracy); those of them in `results` are servable baselines, which
    are eligible only when more accurate than every model variant (and at gate.min_accuracy)."""
    floor, why_floor, _ = model_floor(results, baselines, g)
    best_model = max((n for n in results if n not in baselines),
                     key=lambda n: results[n]["accuracy"])
    why_not = {}
    for name, m in results.items():
        if not servable[name]:
            m["eligible"] = False
            why_not[name] = "not servable (the server runs ONNX Runtime)"
        elif name in baselines:
            m["eligible"] = (m["accuracy"] > results[best_model]["accuracy"] + 1e-9
                             and (g.min_accuracy is None
                                  or at_least(m["accuracy"], g.min_accuracy)))
            if not m["eligible"]:
                why_not[name] = (f"a baseline serves only when more accurate than every variant "
                                 f"({best_model} {results[best_model]['accuracy']:.4f})"
                                 + ("" if g.min_accuracy is None else
                                    f" and at gate.min_accuracy {g.min_accuracy:g}"))
        else:
            m["eligible"] = at_least(m["accuracy"], floor)
            if not m["eligible"]:
                why_not[name] = f"accuracy {m['accuracy']:.4f} below {floor:.4f} = {why_floor}"
    eligible = [name for name, m in results.items() if m["eligible"]]
    if not eligible:
        return None, why_not
    rank = {
        "smallest": lambda n: (results[n]["size_bytes"], -results[n]["accuracy"]),
        "most_accurate": lambda n: (-results[n]["accuracy"], results[n]["size_bytes"]),
        "fastest": lambda n: (min(latency[n].values()), -results[n]["accuracy"]),
    }[g.policy]
    return min(eligible, key=rank), why_not


def refusal(results: dict[str, dict], baselines: dict[str, dict], g: GateParams) -> str:
    """The gate's refusal when no variant is eligible: the bar, the params key that set it, and
    every variant's accuracy."""
    floor, why_floor, key = model_floor(results, baselines, g)
    accuracies = "; ".join(f"{n} {m['accuracy']:.4f}" for n, m in results.items())
    return (f"gate: no variant is eligible: a model variant needs accuracy >= {floor:.4f} = "
            f"{why_floor} (params.yaml {key}), a baseline more than every model variant; "
            f"test accuracy: {accuracies}; nothing will be packaged")


def write_csv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages evaluate")
    parser.add_argument("--model", type=Path, required=True, help="float model folder")
    parser.add_argument("--compressed", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (test split)")
    for report in ("metrics", "latency", "details", "confusion", "tradeoff", "latency-plot"):
        parser.add_argument(f"--{report}", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the selected variant")
    args = parser.parse_args(argv)
    # The servable baselines' folders: the selected one is copied to --out
    with tempfile.TemporaryDirectory(prefix="kiln-evaluate-") as scratch:
        evaluate(args, load_params(), Path(scratch))


def evaluate(args: argparse.Namespace, params: Params, scratch: Path) -> None:
    card = read_card(args.compressed)
    test = split_of(args.data, "test", card.preprocessing)
    y = test.labels()
    progress = Progress("evaluate")
    fitted = card_part(card, "scoring").baselines(args.data, test, card, params)
    baseline = {name: b.report() for name, b in fitted.items()}
    progress("baselines fitted: " + ", ".join(f"{n} {b.accuracy:.4f}" for n, b in fitted.items()))
    threads = params.evaluate.threads
    variants = load_variants(args.model, args.compressed, threads) + \
        baseline_variants(fitted, card, args.compressed, scratch, threads)
    logits, sample = test_logits(variants, test)
    progress(f"{len(test)} test {card.preprocessing.UNIT} through {len(variants)} variants")
    latency_keys = [f"latency_ms_b{b}" for b in params.evaluate.latency_batch_sizes]
    results, latency, per_class, predictions = {}, {}, {}, {}
    for i, v in enumerate(variants, 1):
        results[v.name], latency[v.name], per_class[v.name], predictions[v.name] = measure(
            v, logits[v.name], y, sample, card.classes, params.evaluate)
        progress(f"variant {i}/{len(variants)} {v.name}: accuracy "
                 f"{results[v.name]['accuracy']:.4f}, latency timed")
    g = params.gate
    selected, why_not = gate(results, {v.name: v.servable for v in variants}, g, latency,
                             baseline)

    # Grouped by measure ("accuracy.int8_onnx"): the columns `dvc exp show` and
    # `dvc metrics diff` show, one per variant and measure.
    write_json(args.metrics, {"selected": selected, **{
        measure: {n: value(m) for n, m in results.items()} for measure, value in SUMMARY.items()},
        **baseline})
    write_json(args.latency, {k: {n: latency[n][k] for n in results} for k in latency_keys})
    write_json(args.details, {"gate": dataclasses.asdict(g), "selected": selected,
                              "variants": results, "why_not": why_not, "per_class": per_class,
                              **baseline})
    shown = predictions[selected or "float_torch"]
    write_csv(args.confusion, ["actual", "predicted"],
              ((card.classes[a], card.classes[b]) for a, b in zip(y, shown)))
    write_csv(args.tradeoff, ["variant", "accuracy", "size_kb", "macs"],
              ([n, m["accuracy"], round(m["size_bytes"] / 1000, 1), m["macs"]]
               for n, m in results.items()))
    write_csv(args.latency_plot, ["variant", "accuracy", *latency_keys],
              ([n, results[n]["accuracy"], *(latency[n][k] for k in latency_keys)]
               for n in results))

    for name, m in results.items():
        print(f"evaluate: {name:12s} acc {m['accuracy']:.4f}  f1 {m['macro_f1']:.4f}  "
              f"{m['size_bytes']:>8,d} B  {m['macs']:>8,d} MACs  "
              + "  ".join(f"b{k.removeprefix('latency_ms_b')} {v:.3f} ms"
                          for k, v in latency[name].items())
              + f"  {why_not.get(name, 'eligible')}")
    for name, m in baseline.items():
        print(f"evaluate: {name}  acc {m['accuracy']:.4f}  f1 {m['macro_f1']:.4f}  ({m['setup']}, "
              "fitted on the train split, same test split"
              + ("" if m["servable"] else f"; not servable: {m['why_not_servable']}") + ")")
    if selected is None:
        raise StageError(refusal(results, baseline, g))

    args.out.mkdir(parents=True, exist_ok=True)
    chosen = next(v for v in variants if v.name == selected)
    shutil.copyfile(chosen.file, args.out / SELECTED_FILE)
    copy_model_files(card, args.compressed, args.out)
    m = results[selected]
    write_card(args.out, dataclasses.replace(
        chosen.card, weights={SELECTED_FILE: sha256_file(args.out / SELECTED_FILE)},
        selection=Selection(variant=selected, accuracy=m["accuracy"], macro_f1=m["macro_f1"],
                            size_bytes=m["size_bytes"], macs=m["macs"], params=m["params"])))
    print(f"evaluate: selected {selected} by gate.policy={params.gate.policy} -> {args.out}")
