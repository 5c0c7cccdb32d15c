"""Text classification through the augment, train, compress and evaluate stages on language
identification from chatterbot-corpus dialogs (inside the installed wheel, no download).

    .venv/bin/python bench/text_bench.py [--set text.train.model=text_bag ...] [--ingested DIR]

Data: unless --ingested names an ingested text folder (the ingest stage's output), the script
writes one (shards and manifest, pipeline/core/dataset.py write_items; each text an item with
the id texts/<split>/<language>/<n>.txt) the way the built-in `languages` source does: the dialog
lines of LANGUAGES, blank lines, repeats within a language and lines two languages share left
out (compared lowercased, whitespace collapsed), up to text.ingest.per_class per language chosen with
data.seed, split stratified by data.split with data.seed.

Each stage runs as dvc.yaml runs it (`python -m pipeline.stages <stage>`, a fresh process) in a
temporary project with the real params.yaml, data.modality text, and --set changes. Reported:
the wall time of each stage's process (import and start-up included; one run; the stages'
own lines, with per-epoch seconds, are printed above it), test accuracy and file size of every
variant
(evaluate's evaluation.json), the TF-IDF + logistic regression baseline on the same split,
MACs and heads from compress.json. The machine's other load is printed with the result
(`os.getloadavg`): on a shared 2-core machine it moves wall times a lot.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.dataset import read_manifest, write_items  # noqa: E402
from tests.project import stage_argv  # noqa: E402

LANGUAGES = ("chinese", "dutch", "english", "italian", "japanese", "korean", "persian",
             "portuguese", "spanish", "ukrainian")
STAGES = ('augment', 'train', 'compress', 'evaluate')  # run as dvc.yaml runs them (tests/project.py stage_argv)


def write_languages(out: Path, per_class: int, split: dict, seed: int) -> int:
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    key = lambda t: re.sub(r"\s+", " ", t.strip().lower())  # noqa: E731
    lines: dict[str, dict[str, str]] = {}
    for language in LANGUAGES:
        found = lines.setdefault(language, {})
        for file in sorted((Path(DATA_DIRECTORY) / language).glob("*.yml")):
            for dialog in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get(
                    "conversations") or []:
                for text in dialog:
                    if isinstance(text, str) and text.strip():
                        found.setdefault(key(text), text)
    count: dict[str, int] = {}
    for found in lines.values():
        for k in found:
            count[k] = count.get(k, 0) + 1
    rng = random.Random(seed)
    items = []
    for language in LANGUAGES:
        own = sorted(t for k, t in lines[language].items() if count[k] == 1)
        rng.shuffle(own)
        own = own[:per_class]
        n_train, n_val = round(len(own) * split["train"]), round(len(own) * split["val"])
        for n, text in enumerate(own):
            part = "train" if n < n_train else "val" if n < n_train + n_val else "test"
            items.append(({"id": f"texts/{part}/{language}/{n}.txt", "label": language,
                           "split": part, "source": f"chatterbot-corpus {language}"},
                          text.encode("utf-8")))
    write_items(out, items, list(LANGUAGES))
    return len(items)


def apply_sets(params: dict, sets: list[str]) -> None:
    for item in sets:
        dotted, value = item.split("=", 1)
        *path, last = dotted.split(".")
        node = params
        for part in path:
            node = node[part]
        node[last] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], help="params key=value (dotted)")
    parser.add_argument("--ingested", type=Path, help="an ingested text folder to use instead")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["modality"] = "text"
    apply_sets(params, args.set)
    project = Path(tempfile.mkdtemp(prefix="text_bench_"))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if args.ingested:
        shutil.copytree(args.ingested, project / "data/ingested")
        n = len(read_manifest(project / "data/ingested")[0])
    else:
        n = write_languages(project / "data/ingested", params["text"]["ingest"]["per_class"],
                            params["data"]["split"], params["data"]["seed"])
    print(f"{n} texts, {project}", flush=True)

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    wall = {}
    for stage in STAGES:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pipeline.stages", *stage_argv(stage)],
                              cwd=project, env=env, capture_output=True, text=True)
        wall[stage] = round(time.perf_counter() - start, 2)
        print(done.stdout.strip(), flush=True)
        if done.returncode != 0:
            sys.exit(f"{stage} failed:\n{done.stderr}")

    metrics = json.loads((project / "reports/evaluation.json").read_text())
    compress = json.loads((project / "models/compressed/compress.json").read_text())
    text = {**params["text"]["train"], **params["text"]["preprocess"]}
    result = {"texts": n, "params": {k: text[k] for k in
                                     ("model", "dim", "layers", "heads", "ffn", "max_epochs",
                                      "batch_size", "vocab_size", "max_tokens")},
              "sets": args.set, "stage_wall_s": wall, "accuracy": metrics["accuracy"],
              "size_kb": metrics["size_kb"], "baseline_tfidf_lr": metrics["baseline_tfidf_lr"],
              "selected": metrics["selected"], "macs": compress["macs"],
              "macs_of": compress["macs_of"], "heads": compress.get("heads"),
              "loadavg_1m_after": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(project)


if __name__ == "__main__":
    main()
