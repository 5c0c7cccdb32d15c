"""Stage 7: champion and challenger, infra validation, promotion, and the champion's Bento exported
for DVC.

The selected model (model.onnx + its card, as evaluate selected it) is the challenger of its
task's champion, as the workspace's champion record names it (--champion, with the exported
Bentos in --export: pipeline/lifecycle/champion.py).

0. What a killed package run left in the BentoML store is deleted (its journal), and the
   challenger's card and weights are checked (sha256).
1. Tags are content addresses: the model's version is a hash of what goes into it (model.onnx,
   its card, the drift reference), the Bento's a hash of the model tag, the Bento's sources and
   its arguments (params.yaml serve) and its pinned Python packages. A challenger whose Bento tag
   is the champion's is the champion already: nothing is promoted again. One that `make rollback`
   retired is not promoted again either.
2. Otherwise challenger and champion are scored on the same test split (--data, ONNX Runtime,
   each with the preprocessing in its own card, by the model's scoring part,
   pipeline/modalities/<modality>/scoring.py; the champion from its checked export, else the
   store). The challenger goes on only if its accuracy is at least the champion's minus
   package.champion_tolerance; with no champion yet, evaluate's gate was the whole bar; with a
   champion whose files are not here (not pulled), it goes on with a warning. A worse challenger
   is not packaged: nothing enters the store, the champion keeps serving, the stage succeeds.
3. The challenger is saved as package.model_name (labelled with task, variant, accuracy, macro
   F1, git revision) and its Bento built (pipeline/lifecycle/bento_build.py) from bentofile.yaml
   with the model's full tag and params.yaml serve as build arguments
   (pipeline/serving/service.py serves exactly that model). The Bento's requirements are
   bentofile.yaml's python.packages and bentoml with everything they require, each pinned (`==`)
   to the version installed here, the one infra validation serves with; the build resolves
   nothing over the network. A full disk is one StageError naming it; a failed build leaves
   nothing in BentoML's build space.
4. Infra validation (pipeline/lifecycle/infra_validation.py): the new Bento runs under `bentoml
   serve` on a free loopback port (pipeline/lifecycle/local_server.py: it dies with this stage);
   every test item goes through every protocol the Bento serves, as pipeline/serving/protocols.py
   PROTOCOLS lists them: the model's REST endpoints and, in batches of up to
   serve.max_batch_items (fewer where a request would pass serve.max_request_bytes), gRPC
   ModelInfer (the Open Inference Protocol, pipeline/serving/oip.py), each request made as the
   model's infra part says (pipeline/modalities/<modality>/infra.py, pipeline/core/modality.py
   Infra: an image model's test images as their files to /classify and as .npy files to
   /classify_npy, raw pixels over gRPC; a text model's test texts to /classify_text and
   /classify_text_batch, BYTES over gRPC); the served classes and probabilities must equal the
   ones computed here from the same split, over every protocol. Any failure deletes the new Bento
   and model, leaves the champion in place and fails the stage.
5. Promotion: every Bento of the line is exported to --export with its manifest, then the record
   names the new champion (the commit point), keeping the previous one for rollback; exports no
   line names are removed.

--out gets the outcome, the same on every run that ends in the same state (no times, no event
words): the task, the challenger, the champion after this run and whether the challenger serves.
The decision and its reason are printed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from pathlib import Path

from pipeline import StageError
from pipeline.core.card import CARD_FILE, BentoArgs, ModelCard, at_least, read_card, to_dict
from pipeline.core.progress import Progress
from pipeline.lifecycle.bento_build import (content_version, in_store, read_bentofile,
                                            store_and_build)
from pipeline.lifecycle.champion import (Champion, Exports, Line, NotFound, Record, Task, begin,
                                         clean_up_killed_run, end, no_space_left, read_record,
                                         remove_build_leftovers, write_record)
from pipeline.lifecycle.infra_validation import infra_validate, test_accuracy
from pipeline.params import MODALITIES, PackageParams, ServeParams, load_params, section


def package(model_dir: Path, bentofile: Path, data_dir: Path, reference: Path,
            record_path: Path, exports: Exports, p: PackageParams, serve: ServeParams,
            limits: dict, seed: int) -> dict:
    """Steps 0-6 of the module doc; returns the --out report. `limits`: modality -> its serve
    section (config.Serve); the model's modality's is built into the Bento with `serve`.
    `seed` (data.seed) draws the test items infra validation sends."""
    progress = Progress("package")
    record = read_record(record_path)
    for tag in clean_up_killed_run(keep=record.tags()):
        print(f"package: deleted {tag}, left by a killed package run")
    card = read_card(model_dir)
    if card.selection is None:
        raise StageError(f"{model_dir / CARD_FILE}: no selection; package takes the model the "
                         "evaluate stage selected")
    if not reference.is_file():
        raise StageError(f"{reference}: data profile not found (written by the validate stage)")
    if not bentofile.is_file():
        raise StageError(f"{bentofile}: bentofile not found")
    (weights,) = card.weights
    task = Task(model_name=p.model_name, classes=card.classes)
    model_tag = f"{p.model_name}:" + content_version(*(f.read_bytes() for f in (
        model_dir / weights, model_dir / CARD_FILE, reference)))
    args = BentoArgs(model_tag=model_tag, serve=serve, limits=limits[card.recipe.data.modality])
    build_config, sources = read_bentofile(bentofile, card.recipe.data.modality)
    bento_tag = f"{build_config['name']}:" + content_version(
        json.dumps(to_dict(args), sort_keys=True).encode(),
        json.dumps(build_config, sort_keys=True).encode(), *(f.read_bytes() for f in sources))
    challenger = Champion(model_tag=model_tag, bento_tag=bento_tag,
                          accuracy=round(test_accuracy(model_dir, card, data_dir), 5),
                          weights_sha256=card.weights[weights])
    line = record.line(task)
    current = line.champion

    def build() -> str:
        progress(f"challenger test accuracy {challenger.accuracy:.4f}; storing {model_tag}, "
                 f"building {bento_tag} and serving it for infra validation")
        checked = build_and_validate(model_dir, card, task, bentofile, build_config, args,
                                     bento_tag, reference, data_dir, p, seed)
        tested = f"{checked['tested']} through {', '.join(checked['endpoints'])}"
        progress(f"infra validation passed: {tested}")
        return tested

    if model_tag in line.retired:
        reason = (f"the challenger {model_tag} was rolled back from (`make rollback`), so it is "
                  f"not promoted again; {current.bento_tag} keeps serving")
    elif current is not None and current.bento_tag == bento_tag:
        reason = f"the challenger is the champion already ({bento_tag}); nothing to promote"
        if exports.verified(bento_tag) is None and not in_store(bento_tag):
            reason += f" (rebuilt here after infra validation: {build()})"
    else:
        stored = exports.model_folder(current) if current is not None else None
        if current is not None and stored is not None:
            accuracy_now = test_accuracy(stored, read_card(stored), data_dir)
            if not at_least(challenger.accuracy, accuracy_now - p.champion_tolerance):
                reason = (f"challenger test accuracy {challenger.accuracy:.4f} < champion "
                          f"{accuracy_now:.4f} - package.champion_tolerance "
                          f"{p.champion_tolerance}; the champion keeps serving")
                return finish(record, line, challenger, record_path, exports, reason)
        tested = build()
        if current is None:
            why = "first champion of this task (evaluate's gate thresholds only)"
        elif stored is None:
            why = (f"NOT compared with the champion {current.bento_tag} that {record_path} names: "
                   f"its Bento is neither in {exports.folder} nor in the BentoML store (`dvc "
                   "pull` brings it); it stays in the line, for rollback")
            print(f"package: warning: {why}")
        else:
            why = (f"challenger test accuracy {challenger.accuracy:.4f} >= champion "
                   f"{accuracy_now:.4f} - package.champion_tolerance {p.champion_tolerance}")
        line = Line(task=task, champion=challenger,
                    previous=line.previous + ([current] if current else []), retired=line.retired)
        reason = f"promoted {bento_tag} after infra validation ({tested}): {why}"
    report = finish(record, line, challenger, record_path, exports, reason)
    end()
    return report


def finish(record: Record, line: Line, challenger: Champion, record_path: Path,
           exports: Exports, reason: str) -> dict:
    """Every Bento the line names exported and checked, then the record written (the commit
    point: pipeline/lifecycle/champion.py), then exports no line names removed; returns the report."""
    for tag in [line.champion.bento_tag] + [c.bento_tag for c in reversed(line.previous)]:
        if exports.verified(tag) is None:
            if not in_store(tag):
                if tag == line.champion.bento_tag:
                    raise StageError(f"champion {tag} is neither in {exports.folder} nor in the "
                                     f"BentoML store: run `dvc pull {exports.folder}`")
                print(f"package: warning: previous champion {tag} is neither in "
                      f"{exports.folder} nor in the BentoML store; `make rollback` cannot "
                      "restore it until `dvc pull` brings it")
                continue
            exports.add(tag)
    record = record.with_line(line)
    write_record(record_path, record)
    exports.prune(record.bento_tags())
    return report(line.task, challenger, line.champion, reason)


def build_and_validate(model_dir: Path, card: ModelCard, task: Task, bentofile: Path,
                       build_config: dict, args: BentoArgs, bento_tag: str, reference: Path,
                       data_dir: Path, p: PackageParams, seed: int) -> dict:
    """Store the model and build its Bento from build_config (read_bentofile; each unless the
    store has it already), then infra-validate; on any failure delete what this run created.
    The journal names both tags first."""
    created = []
    build_space = begin(args.model_tag, bento_tag)
    try:
        with no_space_left(f"storing {args.model_tag} and building {bento_tag} in "
                           f"{os.environ['BENTOML_HOME']}"):
            store_and_build(model_dir, card, task, bentofile, build_config, args, bento_tag,
                             reference, created)
        return infra_validate(bento_tag, args, model_dir, card, data_dir, p.ready_timeout_s,
                              p.infra_items, seed)
    except BaseException:
        for delete, tag in reversed(created):
            with contextlib.suppress(NotFound):
                delete(tag)
        remove_build_leftovers(build_space)
        end()
        raise


def report(task: Task, challenger: Champion, champion: Champion, reason: str) -> dict:
    return {"task": dataclasses.asdict(task),
            "challenger": {**dataclasses.asdict(challenger),
                           "accuracy": round(challenger.accuracy, 5)},
            "champion": {**dataclasses.asdict(champion), "accuracy": round(champion.accuracy, 5)},
            "challenger_serves": champion.bento_tag == challenger.bento_tag,
            "reason": reason}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages package")
    parser.add_argument("--model", type=Path, required=True, help="the selected model's folder")
    parser.add_argument("--bentofile", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="ingested folder (test split)")
    parser.add_argument("--reference", type=Path, required=True,
                        help="data profile of the training data (validate --profile), for drift")
    parser.add_argument("--champion", type=Path, required=True,
                        help="the champion record (pipeline/lifecycle/champion.py) to read and update")
    parser.add_argument("--export", type=Path, required=True,
                        help="folder of the exported Bentos the record names, with manifests")
    parser.add_argument("--out", type=Path, required=True, help="the report (JSON)")
    args = parser.parse_args(argv)
    params = load_params()
    result = package(args.model, args.bentofile, args.data, args.reference, args.champion,
                     Exports(args.export), params.package, params.serve,
                     {m: section(params, m).serve for m in MODALITIES}, params.data.seed)
    reason = result.pop("reason")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"package: {reason}")
    print(f"package: champion of {Task(**result['task']).key}: {result['champion']['bento_tag']}; "
          f"named by {args.champion}, serve it with `make serve`")
