"""Counterfactual makers: one file per variant, one interface (`CounterfactualMaker`).

Variants register a factory under a name; the engine and the CLI build makers through
`create_maker(name, pipe, **settings)` and never branch on the name. Names not registered yet are
looked up on first use by importing, in order: the module `cyclex.counterfactuals.<name>` (dashes
as underscores), every `cyclex.counterfactuals.registry_*` module, and the `cyclex.makers` entry
points of installed packages; each of these registers its variants with `register_maker`.
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


_DISCOVERED = False


def _discover() -> None:
    """Import the registry_* modules of this package and the `cyclex.makers` entry points (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import pkgutil
    from importlib.metadata import entry_points

    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("registry_"):
            importlib.import_module(f"{__name__}.{module.name}")
    for entry in entry_points(group="cyclex.makers"):
        register_maker(entry.name, entry.load())


def available_makers() -> tuple[str, ...]:
    _discover()
    return tuple(sorted(_MAKERS))


def get_maker_factory(name: str) -> MakerFactory:
    key = str(name).strip().lower()
    module = key.replace("-", "_")
    if key not in _MAKERS and module.isidentifier():
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise
    if key not in _MAKERS:
        _discover()
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
