"""dvc.yaml's deps against the code: every stage lists exactly the project files it runs (derived
from the imports by pipeline.core.import_closure, the set the train checkpoint fingerprint hashes too), the
Bento ships exactly the service's files, and stage modules are leaves. A missing dep would let
`dvc repro` call a stale model up to date; tests/test_pipeline.py checks what a changed shared
module really reruns."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.stages.__main__ import STAGES
from pipeline.core.import_closure import ROOT, source_files
from pipeline.params import MODALITIES

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
BENTOFILE = yaml.safe_load((ROOT / "bentofile.yaml").read_text())


def relative(files: list[Path]) -> set[str]:
    return {f.relative_to(ROOT).as_posix() for f in files}


MODALITY_DEP = "pipeline/modalities/${data.modality}"  # DVC fills in params.yaml's data.modality


def stage_files(stage: str, modality: str) -> set[str]:
    """What `python -m pipeline.stages <stage>` runs for a `modality`; package also builds the
    Bento from the service's sources (the served modality's: pipeline/lifecycle/bento_build.py)."""
    modules = ["pipeline.stages.__main__", f"pipeline.stages.{stage}"]
    files = relative(source_files(*modules, modality=modality))
    if stage == "package":
        files |= relative(source_files("pipeline.serving.service", modality=modality))
        files |= {"bentofile.yaml"}
    return files


def in_a_modality(file: str) -> bool:
    return file.startswith("pipeline/modalities/") and file.count("/") > 2


def test_dvc_yaml_runs_the_stages_of_the_cli_in_order():
    assert list(DVC_YAML) == list(STAGES)
    for stage, spec in DVC_YAML.items():
        assert " ".join(spec["cmd"].split()).startswith(f"python -m pipeline.stages {stage} ")


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_project_files_it_runs(stage):
    """Its files outside the modalities by name; the modality's files as the one folder of the
    modality in use, and never a file of one modality that imports another's code."""
    deps = DVC_YAML[stage]["deps"]
    code_deps = {d for d in deps if d.endswith(".py") or d == "bentofile.yaml"}
    shared = set()
    for modality in MODALITIES:
        files = stage_files(stage, modality)
        assert {f for f in files if in_a_modality(f)} <= relative(
            (ROOT / "pipeline" / "modalities" / modality).rglob("*.py")), f"{stage}, {modality}"
        if any(in_a_modality(f) for f in files):
            assert MODALITY_DEP in deps, f"{stage}: add {MODALITY_DEP} to its deps"
        shared |= {f for f in files if not in_a_modality(f)}
    assert sorted(shared - code_deps) == [], f"{stage}: add these to its deps in dvc.yaml"
    assert sorted(code_deps - shared) == [], f"{stage}: it does not run these"


@pytest.mark.parametrize("modality", MODALITIES)
def test_the_bento_includes_exactly_the_services_files(modality):
    """bentofile.yaml's include: the service's files every modality shares; the package stage
    adds the served modality's own (pipeline/lifecycle/bento_build.py modality_sources)."""
    from pipeline.lifecycle.bento_build import modality_sources

    served = relative(source_files("pipeline.serving.service", modality=modality))
    assert sorted(BENTOFILE["include"]) == sorted(f for f in served if not in_a_modality(f))
    assert sorted(modality_sources(modality)) == sorted(f for f in served if in_a_modality(f))


@pytest.mark.parametrize("stage", STAGES)
def test_stage_modules_are_leaves(stage):
    others = {f"pipeline/stages/{s}.py" for s in STAGES if s != stage}
    assert sorted(relative(source_files(f"pipeline.stages.{stage}")) & others) == []


def test_the_source_set_follows_imports_inside_functions_and_packages(tmp_path, monkeypatch):
    import pipeline.core.import_closure as sources

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from . import b\n    import pkg.c.d\n")
    (tmp_path / "pkg" / "b.py").write_text("import json\n")
    (tmp_path / "pkg" / "c").mkdir()
    (tmp_path / "pkg" / "c" / "__init__.py").write_text("from pkg.e import x\n")
    (tmp_path / "pkg" / "c" / "d.py").write_text("")
    (tmp_path / "pkg" / "e.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "unused.py").write_text("")
    monkeypatch.setattr(sources, "ROOT", tmp_path)
    assert relative_to(tmp_path, sources.source_files("pkg.a")) == {
        "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/c/__init__.py", "pkg/c/d.py", "pkg/e.py"}


def relative_to(root: Path, files: list[Path]) -> set[str]:
    return {f.relative_to(root).as_posix() for f in files}


def test_a_modality_part_counts_as_that_part_of_every_modality(tmp_path, monkeypatch):
    """`part(name, "checks")` imports by name at run time: the closure still holds
    pipeline/modalities/<modality>/checks.py of every registered modality, and no other part."""
    import pipeline.core.import_closure as sources
    from pipeline.params import MODALITIES

    stage = tmp_path / "pipeline" / "stage.py"
    stage.parent.mkdir()
    (stage.parent / "__init__.py").write_text("")
    stage.write_text("from pipeline.core.modality import part\n\ndef run(m):\n"
                     "    return part(m, 'checks')\n")
    for m in MODALITIES:
        for name in ("checks", "models"):
            (tmp_path / "pipeline" / "modalities" / m).mkdir(parents=True, exist_ok=True)
            (tmp_path / "pipeline" / "modalities" / m / f"{name}.py").write_text("")
    monkeypatch.setattr(sources, "ROOT", tmp_path)
    found = {f.relative_to(tmp_path).as_posix() for f in sources.source_files("pipeline.stage")}
    assert {f"pipeline/modalities/{m}/checks.py" for m in MODALITIES} <= found
    assert not any(f.endswith("models.py") for f in found)
