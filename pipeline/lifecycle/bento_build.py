"""A challenger's Bento, for the package stage: content-addressed tags, bentofile.yaml read as
the build gets it (python.packages pinned to what is installed here, the served modality's code
only), and the model stored and its Bento built in the BentoML store."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline import StageError
from pipeline.core.card import CARD_FILE, BentoArgs, ModelCard, to_dict
from pipeline.core.import_closure import ROOT, source_files
from pipeline.lifecycle.champion import REFERENCE_FILE, NotFound, Task, bentoml


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


def modality_sources(modality: str) -> list[str]:
    """The files of pipeline/modalities/<modality>/ the service runs to serve a model of it (its
    preprocessing, serving part, params section and what they import): read from the code, as
    dvc.yaml's deps are (pipeline/core/import_closure.py), relative to the project."""
    folder = ROOT / "pipeline" / "modalities" / modality
    return [f.relative_to(ROOT).as_posix()
            for f in source_files("pipeline.serving.service", modality=modality)
            if folder in f.parents]


def read_bentofile(bentofile: Path, modality: str) -> tuple[dict, list[Path]]:
    """bentofile.yaml as the build gets it (keyword arguments of bentoml.bentos.build, with
    python.packages pinned: pinned_packages, and `include`, the service's files every modality
    shares, with the served modality's own: modality_sources; no other modality's code), and
    the files `include` lists with bentofile.yaml itself: what the build copies into the
    Bento."""
    config = yaml.safe_load(bentofile.read_text())
    config["include"] = [*config["include"], *modality_sources(modality)]
    config["python"] = {**config["python"],
                        "packages": pinned_packages(config["python"]["packages"])}
    root = bentofile.resolve().parent
    return config, [bentofile.resolve(), *(root / name for name in config["include"])]


def bento_envs(build_config: dict) -> list:
    """bentofile.yaml `envs` as bentoml.bentos.build takes them: BentoML's env records (`bentoml
    build` converts a bentofile's entries itself; bentos.build passes them on as they come)."""
    from bentoml._internal.bento.build_config import BentoEnvSchema

    return [BentoEnvSchema(**env) for env in build_config.get("envs", [])]


def store_model(tag: str, model_dir: Path, card: ModelCard, task: Task, git: str,
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


def in_store(bento_tag: str) -> bool:
    try:
        bentoml.bentos.get(bento_tag)
        return True
    except NotFound:
        return False


def store_and_build(model_dir: Path, card: ModelCard, task: Task, bentofile: Path,
                     build_config: dict, args: BentoArgs, bento_tag: str, reference: Path,
                     created: list) -> None:
    """The model into the store and its Bento built, each unless the store has it; what is
    created is appended to `created` (delete function, tag) as soon as it exists."""
    try:
        bentoml.models.get(args.model_tag)
    except NotFound:
        store_model(args.model_tag, model_dir, card, task,
                     git_revision(bentofile.resolve().parent), reference)
        created.append((bentoml.models.delete, args.model_tag))
    try:
        bentoml.bentos.get(bento_tag)
    except NotFound:
        bentoml.bentos.build(**{**build_config, "envs": bento_envs(build_config)},
                             build_ctx=str(bentofile.resolve().parent),
                             version=bento_tag.split(":")[1], args=to_dict(args))
        created.append((bentoml.bentos.delete, bento_tag))
