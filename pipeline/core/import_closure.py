"""Which project source files a module runs: itself and every project module it imports,
directly or not, read from the code (import statements anywhere in a file, including those
inside functions and those under `if TYPE_CHECKING:`: an annotation's type is part of the code
it describes; a modality part fetched by `part(..., "<name>")`, pipeline/core/modality.py, is
pipeline/modalities/<modality>/<name>.py of the modality in use). dvc.yaml's deps of a stage
list exactly these files, those of the modality in use as its folder
`pipeline/modalities/${data.modality}` (tests/test_deps.py checks it), and the train stage's
checkpoint fingerprint hashes them, so a change to any code a stage runs reruns that stage and
invalidates its checkpoints, and a change to another modality's code does neither. What those files need installed (outside_imports) leaves the TYPE_CHECKING
imports out: they never run, so the Bento needs no torch for the seam's annotations.
"""
from __future__ import annotations

import ast
from pathlib import Path

from pipeline.params import MODALITIES

ROOT = Path(__file__).resolve().parents[2]  # the project: `pipeline` is a package in it


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(file: Path, for_annotations: bool,
                    modalities: tuple[str, ...] = MODALITIES) -> set[str]:
    """What `file` imports (a part call: that part of each of `modalities`); `for_annotations`:
    also under `if TYPE_CHECKING:`."""
    package = file.relative_to(ROOT).with_suffix("").parts[:-1]
    names = set()
    tree = ast.parse(file.read_text(encoding="utf-8"))
    for node in ast.walk(tree) if for_annotations else _run_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, `level - 1` packages up
                parts = package[:len(package) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
        elif _is_part_call(node):
            names.update(f"pipeline.modalities.{m}.{node.args[1].value}" for m in modalities)
    return names


def _run_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:`: imports for type annotations
    only never run."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_part_call(node: ast.AST) -> bool:
    """`part(modality, "<name>")` or `card_part(card, "<name>")` (pipeline/core/modality.py)."""
    if not isinstance(node, ast.Call) or len(node.args) != 2:
        return False
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    return func in ("part", "card_part") and isinstance(node.args[1], ast.Constant) \
        and isinstance(node.args[1].value, str)


def source_files(*modules: str, modality: str | None = None) -> list[Path]:
    """The project files that importing `modules` runs (a package's __init__ runs with any of
    its modules), sorted, as absolute paths: with a part fetched for `modality` only, or for
    every registered modality when None."""
    todo = []
    for module in modules:
        start = _module_file(module)
        if start is None:
            raise ValueError(f"{module}: no such module in {ROOT}")
        todo.append(start)
    seen: set[Path] = set()
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        for name in _imported_names(file, True, MODALITIES if modality is None else (modality,)):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return sorted(seen)


def outside_imports(*modules: str) -> set[str]:
    """Top-level names of the modules that the project files of `modules` import from outside
    the project (standard library included): what an environment running them must provide."""
    return {name.split(".")[0] for file in source_files(*modules)
            for name in _imported_names(file, for_annotations=False)
            if name and _module_file(name.split(".")[0]) is None}
