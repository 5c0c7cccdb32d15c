"""The registries of named variants (pipeline/core/registry.py): every one refuses an unknown name
with its params key, the nearest registered name and all of them, and params.yaml's names are
checked against them when it is loaded."""
from functools import reduce
from pathlib import Path

import pytest
import yaml

from pipeline import StageError
from pipeline.core.modality import part
from pipeline.core.pruning import PRUNERS
from pipeline.core.registry import Registry
from pipeline.params import MODALITIES, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]
# Every registry: each modality's models and the pruning methods.
REGISTRIES = {**{m: part(m, "models").MODELS for m in MODALITIES}, "pruning": PRUNERS}


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
        section, key = registry.key.split(".")
        raw[section][key] = misspelt(name)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError) as e:
            load_params(path)
        assert str(e.value) == (f"{path}: {registry.key}: expected one of {list(registry)}, got "
                                f"{misspelt(name)!r} (did you mean {name!r}?)")
        raw[section][key] = name
        path.write_text(yaml.safe_dump(raw))
        assert reduce(getattr, registry.key.split("."), load_params(path)) == name
