"""Structured pruning on digits with the real params.yaml: the float model, and this checkout's
pipeline.stages.compress prune_and_finetune of it.

    .venv/bin/python bench/prune_bench.py --model lenet5

One float model is trained per run (train recipe, --float-epochs), then a copy is pruned by
compress.prune_method / prune_amount and fine-tuned with the compress recipe. Reported per
variant: MACs and params (count_macs / count_params), ONNX size, test accuracy through ONNX
Runtime (as evaluate measures it), and the wall time of prune_and_finetune (prune + fine-tune:
the bulk of the compress stage), one run. (Until the training core read the train split as a
stream, --old-ref ran a git ref's compress.py beside it: that comparison, in docs/benchmarks.md,
was made at the commit it names; an old compress.py cannot run on today's training core.)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.stages import compress  # noqa: E402
from pipeline.core.card import onnx_predictor  # noqa: E402
from pipeline.modalities.image import models  # noqa: E402
from pipeline.modalities.image.export import export_onnx  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.core.training import fit, make_optimizer, make_schedule  # noqa: E402
from tests.test_compress import digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, choices=sorted(models.MODELS))
    parser.add_argument("--float-epochs", type=int, help="default: image.train.max_epochs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = load_params(REPO / "params.yaml")
    recipe = models.recipe(params)
    epochs = args.float_epochs or recipe.max_epochs
    tmp = Path(tempfile.mkdtemp())
    prep, data, test_x, test_labels = digits(params, tmp / "digits")
    shape = (1, params.image.preprocess.image_size, params.image.preprocess.image_size)

    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    torch.manual_seed(recipe.seed)
    model = models.build(args.model, channels=1, classes=10, image_size=params.image.preprocess.image_size)
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, recipe.momentum,
                               recipe.weight_decay)
    fit(model, data, epochs=epochs, batch_size=recipe.batch_size, optimizer=optimizer,
        scheduler=make_schedule(recipe.lr_schedule, optimizer, recipe.lr,
                                data.steps(recipe.batch_size) * epochs),
        label_smoothing=recipe.label_smoothing, memory_format=memory_format,
        cuda_graph=recipe.cuda_graph)
    model.eval()

    def measure(name: str, net: torch.nn.Module, seconds: float | None) -> dict:
        export_onnx(net, prep, tmp / f"{name}.onnx")
        predict = onnx_predictor(tmp / f"{name}.onnx", 2)
        return {"variant": name, "macs": compress.count_macs(net, shape),
                "params": compress.count_params(net),
                "onnx_bytes": (tmp / f"{name}.onnx").stat().st_size,
                "test_acc": round(float((predict(test_x).argmax(1) == test_labels).mean()), 4),
                "prune_finetune_s": seconds and round(seconds, 1)}

    rows = [measure("float", model, None)]
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    pruned = compress.prune_and_finetune(copy.deepcopy(model), data, torch.zeros(1, *shape),
                                         params.compress, recipe)
    rows.append(measure("pruned", pruned, time.perf_counter() - start))
    for row in rows:
        print(json.dumps({"model": args.model, "float_epochs": epochs, **row}))


if __name__ == "__main__":
    main()
