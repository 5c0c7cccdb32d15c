"""Stage 7: champion and challenger, infra validation, promotion, and the champion's Bento
exported for DVC.

The selected model (model.onnx + its card, as evaluate selected it) is the challenger of its
task's champion, as the workspace's champion record names it (--champion, with the exported
Bentos in --export: pipeline/lifecycle/champion.py).

0. What a killed package run left in the BentoML store is deleted (its journal), and the
   challenger's card and weights are checked (sha256).
1. Tags are content addresses: the model's version is a hash of what goes into it (model.onnx,
   its card, the drift reference), the Bento's a hash of the model tag, the Bento's sources and
   its arguments (params.yaml serve) and its pinned Python packages. A challenger whose Bento
   tag is the champion's is the champion already: nothing is promoted again. One that `make
   rollback` retired is not promoted again either.
2. Otherwise challenger and champion are scored on the same test split (--data, ONNX Runtime,
   each with the preprocessing in its own card, by the model's scoring part,
   pipeline/modalities/<modality>/scoring.py; the champion from its checked export, else the store). The
   challenger goes on only if its accuracy is at least the champion's minus
   package.champion_tolerance; with no champion yet, evaluate's gate was the whole bar; with a
   champion whose files are not here (not pulled), it goes on with a warning. A worse
   challenger is not packaged: nothing enters the store, the champion keeps serving, the stage
   succeeds.
3. The challenger is saved as package.model_name (labelled with task, variant, accuracy, macro
   F1, git revision) and its Bento built from bentofile.yaml with the model's full tag and
   params.yaml serve as build arguments (pipeline/serving/service.py serves exactly that model). The
   Bento's requirements are bentofile.yaml's python.packages and bentoml with everything they
   require, each pinned (`==`) to the version installed here, the one infra validation serves
   with; the build resolves nothing over the network. A full disk is one StageError naming it;
   a failed build leaves nothing in BentoML's build space.
4. Infra validation: the new Bento runs under `bentoml serve` on a free loopback port
   (pipeline/lifecycle/local_server.py: it dies with this stage); every test item goes through
   every protocol the Bento serves, as pipeline/serving/protocols.py PROTOCOLS lists them: the
   model's REST endpoints and, in batches of up to serve.max_batch_images (fewer where a request
   would pass serve.max_request_bytes), gRPC ModelInfer (the Open Inference Protocol,
   pipeline/serving/oip.py), each request made as the model's infra part says
   (pipeline/modalities/<modality>/infra.py, pipeline/core/modality.py Infra: an image model's test images as
   their files to /classify and as .npy files to /classify_npy, raw pixels over gRPC; a text
   model's test texts to /classify_text and /classify_text_batch, BYTES over gRPC); the served
   classes and probabilities must equal the ones computed here from the same split, over every
   protocol. Any failure deletes the new Bento and model, leaves the champion in place and
   fails the stage.
5. Promotion: every Bento of the line is exported to --export with its manifest, then the
   record names the new champion (the commit point), keeping the previous one for rollback;
   exports no line names are removed.

--out gets the outcome, the same on every run that ends in the same state (no times, no event
words): the task, the challenger, the champion after this run and whether the challenger serves.
The decision and its reason are printed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline import StageError
from pipeline.core.card import (CARD_FILE, BentoArgs, ModelCard, at_least, onnx_predictor,
                           predict_in_batches, read_card, softmax, to_dict)
from pipeline.lifecycle.champion import (REFERENCE_FILE, Champion, Exports, Line, NotFound, Record, Task,
                               begin, bentoml, clean_up_killed_run, end, no_space_left,
                               read_record, remove_build_leftovers, write_record)
from pipeline.core.dataset import read_manifest
from pipeline.core.modality import card_part
from pipeline.params import PackageParams, ServeParams, load_params
from pipeline.core.progress import Progress
from pipeline.lifecycle.local_server import serving
from pipeline.serving.protocols import PROTOCOLS, Bento, Split


def git_revision(folder: Path) -> str:
    """Short commit hash of the checkout holding `folder`; "unknown" outside git or before the
    first commit."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder,
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:  # git not installed
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def content_version(*parts: bytes) -> str:
    """A BentoML version that is a content address: 20 hex digits of the parts' sha256."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:20]


def pinned_packages(names: list[str]) -> list[str]:
    """`names` and bentoml, with everything they require (extras and environment markers
    evaluated for this interpreter), as `Name==version` of what is installed here, sorted;
    bentoml itself left out: BentoML adds its own pin to every Bento. Raises StageError naming a
    package that is not installed, or whose version is outside what requires it."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()  # (package, extra) whose requirements are queued
    todo = [(Requirement(name), "bentofile.yaml python.packages") for name in names]
    todo.append((Requirement("bentoml"), "the service"))
    while todo:
        requirement, wanted_by = todo.pop()
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise StageError(f"{requirement.name}: required by {wanted_by} for the Bento, but "
                             "not installed here") from None
        if not requirement.specifier.contains(dist.version, prereleases=True):
            raise StageError(f"{requirement.name} {dist.version} is installed, but {wanted_by} "
                             f"requires {requirement}")
        name = canonicalize_name(dist.metadata["Name"])
        pins[name] = f"{dist.metadata['Name']}=={dist.version}"
        for extra in ("", *requirement.extras):
            if (name, extra) not in seen:
                seen.add((name, extra))
                todo.extend((r, f"{name} {dist.version}")
                            for r in map(Requirement, dist.requires or [])
                            if r.marker is None or r.marker.evaluate({"extra": extra}))
    del pins["bentoml"]
    return sorted(pins.values(), key=str.lower)


def read_bentofile(bentofile: Path, modality: str) -> tuple[dict, list[Path]]:
    """bentofile.yaml as the build gets it (keyword arguments of bentoml.bentos.build, with
    python.packages pinned: pinned_packages, and `include` without other modalities' code: the
    service loads the served model's modality only), and the files that `include` lists with
    bentofile.yaml itself: what the build copies into the Bento."""
    config = yaml.safe_load(bentofile.read_text())
    config["include"] = [name for name in config["include"] if not name.startswith(
        "pipeline/modalities/") or name.count("/") == 2
        or name.startswith(f"pipeline/modalities/{modality}/")]
    config["python"] = {**config["python"],
                        "packages": pinned_packages(config["python"]["packages"])}
    root = bentofile.resolve().parent
    return config, [bentofile.resolve(), *(root / name for name in config["include"])]


def bento_envs(build_config: dict) -> list:
    """bentofile.yaml `envs` as bentoml.bentos.build takes them: BentoML's env records (`bentoml
    build` converts a bentofile's entries itself; bentos.build passes them on as they come)."""
    from bentoml._internal.bento.build_config import BentoEnvSchema

    return [BentoEnvSchema(**env) for env in build_config.get("envs", [])]


def test_probabilities(model_dir: Path, card: ModelCard,
                       data_dir: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """The model's class probabilities for every test item, as the server computes them, the
    labels and the items as read (the model's scoring part)."""
    (weights,) = card.weights
    predict = onnx_predictor(model_dir / weights, 1)
    x, labels, items = card_part(card, "scoring").split_input(data_dir, "test", model_dir, card)
    return softmax(predict_in_batches(predict, x)), labels, items


def test_accuracy(model_dir: Path, card: ModelCard, data_dir: Path) -> float:
    predicted, labels, _ = test_probabilities(model_dir, card, data_dir)
    return float((predicted.argmax(1) == labels).mean())


@contextlib.contextmanager
def _named(prefix: str):
    """Prefix the message of a StageError raised inside the block."""
    try:
        yield
    except StageError as e:
        raise StageError(f"{prefix}{e}") from e


def infra_validate(bento_tag: str, args: BentoArgs, model_dir: Path, card: ModelCard,
                   data_dir: Path, ready_timeout_s: float) -> dict:
    """Serve the Bento and check it answers every test item as model_dir's model does here,
    through every protocol it serves (pipeline/serving/protocols.py PROTOCOLS; gRPC asks for
    args.model_tag by name and version). Raises StageError naming the first differences; returns
    what was checked: "tested" (in words) and the endpoints."""
    rows = [r for r in read_manifest(data_dir)[0] if r["split"] == "test"]
    expected, _, items = test_probabilities(model_dir, card, data_dir)
    split = Split(data=data_dir, rows=rows, items=items)
    served = {}
    with tempfile.TemporaryDirectory() as tmp, \
            _named("infra validation: "), serving(bento_tag, Path(tmp, "serve.log"),
                                                  ready_timeout_s) as client:
        bento = Bento(http=client, grpc_port=client.grpc_port, args=args)
        for answers in PROTOCOLS.values():
            served.update(answers(bento, card, split))
    _compare(bento_tag, rows, expected, served)
    return {"tested": f"{len(rows)} test {card.preprocessing.UNIT}", "endpoints": list(served)}


def _compare(bento_tag: str, rows: list[dict], expected: np.ndarray,
             served: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Raise StageError naming the first endpoint whose answers for the test items at `indices`
    differ from `expected` (the evaluated model's, rows in manifest order) in class or by more
    than 1e-5 in probability."""
    for endpoint, (indices, got) in served.items():
        want = expected[indices]
        wrong = [(rows[i]["path"], int(e), int(a)) for i, e, a in
                 zip(indices, want.argmax(1), got.argmax(1)) if e != a]
        off = float(np.abs(got - want).max()) if got.shape == want.shape else np.inf
        if wrong or off > 1e-5:
            raise StageError(f"infra validation: {endpoint} of {bento_tag} differs from the "
                             f"evaluated model on {len(wrong)} of {len(want)} test items "
                             f"(got {len(got)} answers, probabilities up to {off:.2g} apart); "
                             f"first (file, expected, served): {wrong[:5]}")


def _store_model(tag: str, model_dir: Path, card: ModelCard, task: Task, git: str,
                 reference: Path) -> None:
    (weights,) = card.weights
    labels = {"task": task.key, "variant": card.selection.variant,
              "accuracy": f"{card.selection.accuracy:.4f}",
              "macro_f1": f"{card.selection.macro_f1:.4f}", "git": git}
    with bentoml.models.create(tag, labels=labels, metadata={"classes": card.classes}) as model:
        # The files the model needs beside its weights (a text model's tokenizer) go with it
        # (the card names them by sha256, so the model's content-addressed version covers them).
        extra = [(model_dir / name, name) for name in card.preprocessing.MODEL_FILES]
        for source, name in ((model_dir / weights, weights), (model_dir / CARD_FILE, CARD_FILE),
                             (reference, REFERENCE_FILE), *extra):
            shutil.copyfile(source, model.path_of(name))


def package(model_dir: Path, bentofile: Path, data_dir: Path, reference: Path,
            record_path: Path, exports: Exports, p: PackageParams, serve: ServeParams) -> dict:
    """Steps 0-6 of the module doc; returns the --out report."""
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
    args = BentoArgs(model_tag=model_tag, serve=serve)
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
                                     bento_tag, reference, data_dir, p.ready_timeout_s)
        tested = f"{checked['tested']} through {', '.join(checked['endpoints'])}"
        progress(f"infra validation passed: {tested}")
        return tested

    if model_tag in line.retired:
        reason = (f"the challenger {model_tag} was rolled back from (`make rollback`), so it is "
                  f"not promoted again; {current.bento_tag} keeps serving")
    elif current is not None and current.bento_tag == bento_tag:
        reason = f"the challenger is the champion already ({bento_tag}); nothing to promote"
        if exports.verified(bento_tag) is None and not _in_store(bento_tag):
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


def _in_store(bento_tag: str) -> bool:
    try:
        bentoml.bentos.get(bento_tag)
        return True
    except NotFound:
        return False


def finish(record: Record, line: Line, challenger: Champion, record_path: Path,
           exports: Exports, reason: str) -> dict:
    """Every Bento the line names exported and checked, then the record written (the commit
    point: pipeline/lifecycle/champion.py), then exports no line names removed; returns the report."""
    for tag in [line.champion.bento_tag] + [c.bento_tag for c in reversed(line.previous)]:
        if exports.verified(tag) is None:
            if not _in_store(tag):
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
                       data_dir: Path, ready_timeout_s: float) -> dict:
    """Store the model and build its Bento from build_config (read_bentofile; each unless the
    store has it already), then infra-validate; on any failure delete what this run created.
    The journal names both tags first."""
    created = []
    build_space = begin(args.model_tag, bento_tag)
    try:
        with no_space_left(f"storing {args.model_tag} and building {bento_tag} in "
                           f"{os.environ['BENTOML_HOME']}"):
            _store_and_build(model_dir, card, task, bentofile, build_config, args, bento_tag,
                             reference, created)
        return infra_validate(bento_tag, args, model_dir, card, data_dir, ready_timeout_s)
    except BaseException:
        for delete, tag in reversed(created):
            with contextlib.suppress(NotFound):
                delete(tag)
        remove_build_leftovers(build_space)
        end()
        raise


def _store_and_build(model_dir: Path, card: ModelCard, task: Task, bentofile: Path,
                     build_config: dict, args: BentoArgs, bento_tag: str, reference: Path,
                     created: list) -> None:
    """The model into the store and its Bento built, each unless the store has it; what is
    created is appended to `created` (delete function, tag) as soon as it exists."""
    try:
        bentoml.models.get(args.model_tag)
    except NotFound:
        _store_model(args.model_tag, model_dir, card, task,
                     git_revision(bentofile.resolve().parent), reference)
        created.append((bentoml.models.delete, args.model_tag))
    try:
        bentoml.bentos.get(bento_tag)
    except NotFound:
        bentoml.bentos.build(**{**build_config, "envs": bento_envs(build_config)},
                             build_ctx=str(bentofile.resolve().parent),
                             version=bento_tag.split(":")[1], args=to_dict(args))
        created.append((bentoml.bentos.delete, bento_tag))


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
                     Exports(args.export), params.package, params.serve)
    reason = result.pop("reason")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"package: {reason}")
    print(f"package: champion of {Task(**result['task']).key}: {result['champion']['bento_tag']}; "
          f"named by {args.champion}, serve it with `make serve`")
