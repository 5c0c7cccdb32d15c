"""One kind of registry for every variant params.yaml picks by name: each modality's models
(train.model, text.model, audio.model: the `models` part's MODELS) and the pruning methods
(compress.prune_method: pipeline/core/pruning.py PRUNERS). A variant registers itself with the
registry's `register` decorator in the file that defines it; its name is the function's name.

The names are checked against the registries, not a second list: pipeline/params.py load_params
calls `check_names` once params.yaml has its types, so every stage and the flow refuse a
misspelt name before anything runs. That imports the registries' modules (torch); the model card
path (pipeline/params.py typed(), in the Bento, which has no torch) never does.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

from pipeline import StageError
from pipeline.core.modality import part
from pipeline.params import did_you_mean

if TYPE_CHECKING:
    from pipeline.params import Params

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> variant, for the params.yaml key `key` (e.g. "train.model") whose value names one.
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


def check_names(params: Params) -> None:
    """Every name `params` gives a registry: data.modality's model and compress.prune_method
    (another modality's model key is not read, so not checked). StageError from Registry.get."""
    from pipeline.core import pruning

    for registry in (part(params.data.modality, "models").MODELS, pruning.PRUNERS):
        registry.get(functools.reduce(getattr, registry.key.split("."), params))
