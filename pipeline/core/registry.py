"""One kind of registry for every variant params.yaml picks by name: each modality's models
(image.train.model, text.train.model, audio.train.model: the `models` part's MODELS) and the pruning methods
(compress.prune_method: pipeline/core/pruning.py PRUNERS). A variant registers itself with the
registry's `register` decorator in the file that defines it; its name is the function's name.

The names are checked against the registries, not a second list: pipeline/params.py load_params
reads them from the registering files' source (declared_names: the module-level
`NAME = Registry("<key>")` and the functions or classes decorated `@NAME.register`), so every stage
and the flow refuse a misspelt name before anything runs, without importing those files (torch,
seconds) or making them deps of stages that do not run them. Register in that form only:
tests/test_registry.py checks the names read from source equal every registry's.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from pipeline import StageError
from pipeline.params import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> variant, for the params.yaml key `key` (e.g. "image.train.model") whose value names one.
    Iterates over the names in registration order."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._variants: dict[str, T] = {}

    def register(self, variant: T) -> T:
        """Decorator: `variant` under its __name__."""
        name = variant.__name__
        if name in self._variants:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._variants[name] = variant
        return variant

    def get(self, name: str) -> T:
        """The variant `name`; StageError naming the key, the nearest name and every name."""
        if name not in self._variants:
            raise StageError(f"{self.key}: expected one of {list(self._variants)}, got {name!r}"
                             + did_you_mean(name, self._variants))
        return self._variants[name]

    def __contains__(self, name: object) -> bool:
        return name in self._variants

    def __iter__(self) -> Iterator[str]:
        return iter(self._variants)

    def __len__(self) -> int:
        return len(self._variants)

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self._variants)})"

