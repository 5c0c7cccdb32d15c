"""dvc.yaml's deps against the code: every stage lists exactly the project files it runs (derived
from the imports by pipeline.sources, the set the train checkpoint fingerprint hashes too), the
Bento ships exactly the service's files, and stage modules are leaves. A missing dep would let
`dvc repro` call a stale model up to date; tests/test_pipeline.py checks what a changed shared
module really reruns."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import STAGES
from pipeline.sources import ROOT, source_files

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
BENTOFILE = yaml.safe_load((ROOT / "bentofile.yaml").read_text())


def relative(files: list[Path]) -> set[str]:
    return {f.relative_to(ROOT).as_posix() for f in files}


def stage_files(stage: str) -> set[str]:
    """What `python -m pipeline <stage>` runs; package also builds the Bento from its sources."""
    files = relative(source_files("pipeline.__main__", f"pipeline.{stage}"))
    if stage == "package":
        files |= relative(source_files("pipeline.service")) | {"bentofile.yaml"}
    return files


def test_dvc_yaml_runs_the_stages_of_the_cli_in_order():
    assert list(DVC_YAML) == list(STAGES)
    for stage, spec in DVC_YAML.items():
        assert " ".join(spec["cmd"].split()).startswith(f"python -m pipeline {stage} ")


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_project_files_it_runs(stage):
    code_deps = {d for d in DVC_YAML[stage]["deps"]
                 if d.endswith(".py") or d == "bentofile.yaml"}
    expected = stage_files(stage)
    assert sorted(expected - code_deps) == [], f"{stage}: add these to its deps in dvc.yaml"
    assert sorted(code_deps - expected) == [], f"{stage}: it does not run these"


def test_the_bento_includes_exactly_the_services_files():
    assert sorted(BENTOFILE["include"]) == sorted(relative(source_files("pipeline.service")))


@pytest.mark.parametrize("stage", STAGES)
def test_stage_modules_are_leaves(stage):
    others = {f"pipeline/{s}.py" for s in STAGES if s != stage}
    assert sorted(relative(source_files(f"pipeline.{stage}")) & others) == []


def test_the_source_set_follows_imports_inside_functions_and_packages(tmp_path, monkeypatch):
    import pipeline.sources as sources

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
    pipeline/<modality>/checks.py of every registered modality, and no other part."""
    import pipeline.sources as sources
    from pipeline.params import MODALITIES

    stage = tmp_path / "pipeline" / "stage.py"
    stage.parent.mkdir()
    (stage.parent / "__init__.py").write_text("")
    stage.write_text("from pipeline.modality import part\n\ndef run(m):\n"
                     "    return part(m, 'checks')\n")
    for m in MODALITIES:
        for name in ("checks", "models"):
            (tmp_path / "pipeline" / m).mkdir(exist_ok=True)
            (tmp_path / "pipeline" / m / f"{name}.py").write_text("")
    monkeypatch.setattr(sources, "ROOT", tmp_path)
    found = {f.relative_to(tmp_path).as_posix() for f in sources.source_files("pipeline.stage")}
    assert {f"pipeline/{m}/checks.py" for m in MODALITIES} <= found
    assert not any(f.endswith("models.py") for f in found)
