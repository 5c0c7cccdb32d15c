"""The registries of named variants (pipeline/core/registry.py): every one refuses an unknown name
with its params key, the nearest registered name and all of them, and params.yaml's names are
checked against them when it is loaded: against the names read from the registering files' source
(pipeline/params.py declared_names), which must be the registries' own, without importing torch."""
import inspect
import json
import subprocess
import sys
from functools import reduce
from pathlib import Path

import pytest
import yaml

from pipeline import StageError
from pipeline.core.import_closure import source_files
from pipeline.core.modality import part
from pipeline.core.pruning import PRUNERS
from pipeline.core.registry import Registry
from pipeline.params import MODALITIES, ParamsError, declared_names, load_params, registry_files

REPO = Path(__file__).resolve().parents[1]
# Every registry: each modality's models and the pruning methods.
REGISTRIES = {**{m: part(m, "models").MODELS for m in MODALITIES}, "pruning": PRUNERS}
# The module that fills each registry.
MODULES = {**{m: part(m, "models") for m in MODALITIES},
           "pruning": sys.modules[PRUNERS.get(next(iter(PRUNERS))).__module__]}


def misspelt(name: str) -> str:
    return name[:-1] + ("x" if name[-1] != "x" else "y")


@pytest.mark.parametrize("registry", REGISTRIES.values(), ids=REGISTRIES.keys())
def test_every_registry_refuses_an_unknown_name_with_the_nearest(registry):
    assert len(registry) >= 2
    for name in registry:
        assert registry.get(name).__name__ == name
        with pytest.raises(StageError) as e:
            registry.get(misspelt(name))
        assert str(e.value) == (f"{registry.key}: expected one of {list(registry)}, got "
                                f"{misspelt(name)!r} (did you mean {name!r}?)")
    with pytest.raises(StageError, match=rf"^{registry.key}: expected one of .*, got 'zzz'$"):
        registry.get("zzz")  # nothing close: no guess


def test_a_name_is_registered_once():
    registry = Registry("test.variant")

    @registry.register
    def one():
        pass

    assert list(registry) == ["one"] and "one" in registry and "two" not in registry
    with pytest.raises(ValueError, match="test.variant: 'one' is registered twice"):
        registry.register(one)


@pytest.mark.parametrize("modality", MODALITIES)
def test_params_yaml_names_are_checked_against_the_modality_in_use(tmp_path, modality):
    """data.modality's model key and compress.prune_method, each refused with the nearest name."""
    for registry in (REGISTRIES[modality], PRUNERS):
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["data"]["modality"] = modality
        name = list(registry)[-1]
        *sections, key = registry.key.split(".")
        section = reduce(dict.__getitem__, sections, raw)
        section[key] = misspelt(name)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError) as e:
            load_params(path)
        assert str(e.value) == (f"{path}: {registry.key}: expected one of {list(registry)}, got "
                                f"{misspelt(name)!r} (did you mean {name!r}?)")
        section[key] = name
        path.write_text(yaml.safe_dump(raw))
        assert reduce(getattr, registry.key.split("."), load_params(path)) == name


@pytest.mark.parametrize("name", REGISTRIES, ids=REGISTRIES.keys())
def test_the_names_read_from_source_are_the_registrys(name):
    """load_params checks params.yaml against the names read from the registering file's source
    (no import): they must be exactly the registry's, in its order, so the two never drift (a
    variant registered some other way than `@NAME.register` on a module-level definition fails
    here)."""
    registry, file = REGISTRIES[name], Path(inspect.getsourcefile(MODULES[name])).resolve()
    assert declared_names(file) == {registry.key: list(registry)}


@pytest.mark.parametrize("modality", MODALITIES)
def test_load_params_reads_the_files_of_the_registries_it_checks(modality):
    """The modality's models and the pruning methods: the files whose registries the checked keys
    name."""
    files = [Path(inspect.getsourcefile(MODULES[m])).resolve() for m in (modality, "pruning")]
    assert list(registry_files(modality)) == files


def test_loading_params_imports_neither_torch_nor_a_registry(tmp_path):
    """Every stage loads params.yaml first: the names are read, not imported, so loading stays
    fast (no torch) and the registering files are no dep of a stage that does not run them."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    paths = []
    for modality in MODALITIES:
        raw["data"]["modality"] = modality
        paths.append(tmp_path / f"{modality}.yaml")
        paths[-1].write_text(yaml.safe_dump(raw))
    code = ("import sys; from pipeline.params import load_params\n"
            f"for p in {[str(p) for p in paths]!r}: load_params(p)\n"
            "print(__import__('json').dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True)
    modules = json.loads(done.stdout)
    assert "torch" not in modules
    assert not [m for m in modules if m in ("pipeline.core.registry", "pipeline.core.pruning")
                or m.endswith(".models")]
    for stage in ("ingest", "validate", "augment", "train", "evaluate", "package"):
        files = {f.relative_to(REPO).as_posix()
                 for f in source_files("pipeline.stages.__main__", f"pipeline.stages.{stage}")}
        assert "pipeline/core/pruning.py" not in files, stage
