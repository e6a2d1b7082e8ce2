"""Counterfactual makers: one file per variant, one interface (`CounterfactualMaker`).

Variants register a factory under a name; the engine and the CLI build makers through
`create_maker(name, pipe, **settings)` and never branch on the name. A variant module that is not
registered yet is imported on first use (`cyclex.counterfactuals.<name>`), and registers itself
there with `register_maker`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput

MakerFactory = Callable[..., CounterfactualMaker]
_MAKERS: dict[str, MakerFactory] = {}


def register_maker(name: str, factory: MakerFactory) -> None:
    """Register `factory(pipe, **settings) -> CounterfactualMaker` under `name` (last one wins)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"maker name must be a non-empty string, got {name!r}")
    _MAKERS[name.strip().lower()] = factory


def available_makers() -> tuple[str, ...]:
    return tuple(sorted(_MAKERS))


def get_maker_factory(name: str) -> MakerFactory:
    key = str(name).strip().lower()
    if key not in _MAKERS and key.isidentifier():
        try:
            importlib.import_module(f"cyclex.counterfactuals.{key}")
        except ModuleNotFoundError as err:
            if err.name != f"cyclex.counterfactuals.{key}":
                raise
    if key not in _MAKERS:
        raise KeyError(f"unknown counterfactual variant {name!r}; registered: {', '.join(available_makers())}")
    return _MAKERS[key]


def create_maker(name: str, pipe, **settings) -> CounterfactualMaker:
    """Build the maker registered as `name` on a StableDiffusionPipeline (or what the variant takes)."""
    return get_maker_factory(name)(pipe, **settings)


def _ddim_factory(pipe, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.ddim import DDIMCounterfactualMaker

    return DDIMCounterfactualMaker(pipe, **settings)


register_maker("ddim", _ddim_factory)

__all__ = [
    "CounterfactualMaker",
    "CounterfactualOutput",
    "available_makers",
    "create_maker",
    "get_maker_factory",
    "register_maker",
]
