"""Structured pruning before/after: this checkout's pipeline.stages.compress against the compress.py of
a git ref (the hand-written pruner), on digits with the real params.yaml.

    .venv/bin/python bench/prune_bench.py --model lenet5 --old-ref 613b636

One float model is trained per run (train recipe, --float-epochs), then each implementation
prunes a copy by compress.prune_method / prune_amount and fine-tunes it with the compress recipe.
Reported per implementation: MACs and params (this checkout's count_macs / count_params for
both), pruned ONNX size, test accuracy through ONNX Runtime (as evaluate measures it), and the
wall time of prune_and_finetune (prune + fine-tune: the bulk of the compress stage), one run.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
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
from pipeline.core.training import fit, make_optimizer, make_schedule, steps_per_epoch  # noqa: E402
from tests.test_compress import digits  # noqa: E402


# Modules that moved since the old refs this bench compares against (the modality seam): the
# old compress.py imports them by their old names.
MOVED = {"pipeline.preprocess": "pipeline.modalities.image.preprocess", "pipeline.warp": "pipeline.modalities.image.warp"}


def old_compress(ref: str, tmp: Path):
    source = subprocess.run(["git", "show", f"{ref}:pipeline/stages/compress.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "old_compress.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_compress", path)
    module = importlib.util.module_from_spec(spec)
    aliases = {old: importlib.import_module(new) for old, new in MOVED.items()
               if old not in sys.modules}
    sys.modules.update(aliases)
    try:
        spec.loader.exec_module(module)
    finally:
        for old in aliases:
            del sys.modules[old]
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, choices=sorted(models.MODELS))
    parser.add_argument("--old-ref", required=True, help="git ref holding the old compress.py")
    parser.add_argument("--float-epochs", type=int, help="default: image.train.max_epochs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = load_params(REPO / "params.yaml")
    recipe = models.recipe(params)
    epochs = args.float_epochs or recipe.max_epochs
    tmp = Path(tempfile.mkdtemp())
    prep, x, y, test_x, test_labels = digits(params, tmp / "digits")
    shape = (1, params.image.preprocess.image_size, params.image.preprocess.image_size)

    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    torch.manual_seed(recipe.seed)
    model = models.build(args.model, channels=1, classes=10, image_size=params.image.preprocess.image_size)
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, recipe.momentum,
                               recipe.weight_decay)
    fit(model, x, y, epochs=epochs, batch_size=recipe.batch_size, optimizer=optimizer,
        scheduler=make_schedule(recipe.lr_schedule, optimizer, recipe.lr,
                                steps_per_epoch(len(x), recipe.batch_size, 1) * epochs),
        label_smoothing=recipe.label_smoothing, seed=recipe.seed, memory_format=memory_format,
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
    for name, module in (("old", old_compress(args.old_ref, tmp)), ("new", compress)):
        torch.manual_seed(recipe.seed)
        start = time.perf_counter()
        pruned = module.prune_and_finetune(copy.deepcopy(model), x, y, params.compress, recipe)
        rows.append(measure(name, pruned, time.perf_counter() - start))
    for row in rows:
        print(json.dumps({"model": args.model, "float_epochs": epochs, **row}))


if __name__ == "__main__":
    main()
