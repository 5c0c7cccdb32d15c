"""The modality seam (pipeline/core/modality.py): every registered modality provides every part the
stages call, with the Protocol's parameters, and no stage reaches past the seam."""
from __future__ import annotations

import ast
import inspect
import typing

import pytest

from pipeline.stages.__main__ import STAGES
from pipeline.core.modality import PARTS, part
from pipeline.params import MODALITIES
from pipeline.core.import_closure import ROOT


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("name", PARTS)
def test_every_modality_provides_every_part(modality, name):
    protocol, module = PARTS[name], part(modality, name)
    for attribute in typing.get_type_hints(protocol):  # constants, e.g. Serving.TAKES
        assert hasattr(module, attribute), f"pipeline/modalities/{modality}/{name}.py: no {attribute}"
    for function, method in inspect.getmembers(protocol, inspect.isfunction):
        if function.startswith("_"):
            continue
        assert callable(getattr(module, function, None)), \
            f"pipeline/modalities/{modality}/{name}.py: no function {function}"
        wanted = list(inspect.signature(method).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(module, function)).parameters) == wanted, \
            f"pipeline/modalities/{modality}/{name}.py {function}: parameters are not {wanted}"


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_preprocessing_record_reads_an_ingested_item(modality):
    """split_of (pipeline/core/dataset.py) reads a split through the card's record: its load."""
    record = part(modality, "preprocess").RECORD
    assert isinstance(record.UNIT, str) and isinstance(record.MODEL_FILES, tuple)
    assert callable(getattr(record, "load", None)), \
        f"pipeline/modalities/{modality}/preprocess.py RECORD: no load(path)"


@pytest.mark.parametrize("stage", STAGES)
def test_stages_call_the_seam_not_a_modality(stage):
    """No stage imports a modality's package directly or compares with a modality's name."""
    tree = ast.parse((ROOT / "pipeline" / "stages" / f"{stage}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("pipeline.modalities"), \
                f"pipeline/stages/{stage}.py imports {node.module}"
        if isinstance(node, ast.Compare):
            names = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)}
            assert not names & set(MODALITIES), \
                f"pipeline/stages/{stage}.py line {node.lineno} compares with a modality's name"
