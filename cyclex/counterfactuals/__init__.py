"""Counterfactual makers: one file per variant, one interface (`CounterfactualMaker`).

The layer between the metric core (`cyclex.explain`) and the cyclic engine (`cyclex.cycle`):
makers take their models (and, for the search, their scorer) as arguments and never look anything
up by name. `inversion.py` is the shared DDIM inversion-and-sampling base; `ddim.py`, `nti.py` and
`fast_inversion.py` and `rse.py` (region-specific editing) are variants of it; `search_maker.py` wraps them in seed 000's search;
`instruct.py` is the instruction-editing family (InstructPix2Pix-style models, with or without RSE masking).

The registry is one static table, `BUILTIN_MAKERS` (variant name -> factory), plus the
`cyclex.makers` entry points of installed packages and whatever `register_maker` adds at run time.
The engine and the CLI build makers through `create_maker(name, pipe, **settings)` and never branch
on the name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput

logger = logging.getLogger(__name__)

MakerFactory = Callable[..., CounterfactualMaker]


# Factories import their variant when called, so listing the variants stays cheap (no torch models built).
def _ddim(pipe, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.ddim import DDIMCounterfactualMaker

    return DDIMCounterfactualMaker(pipe, **settings)


def _nti(pipe, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.nti import NullTextInversionMaker

    return NullTextInversionMaker(pipe, **settings)


def _negative_prompt(pipe, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.fast_inversion import NegativePromptInversionMaker

    return NegativePromptInversionMaker(pipe, **settings)


def _direct(pipe, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.fast_inversion import DirectInversionMaker

    return DirectInversionMaker(pipe, **settings)


def _rse(pipe, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.rse import RegionSpecificEditMaker

    return RegionSpecificEditMaker(pipe, **settings)


def _instruct(pipe, *, instruct_model=None, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.instruct import InstructEditMaker, instruct_pipeline_for

    instruct_pipe, model_name = instruct_pipeline_for(pipe, instruct_model)
    return InstructEditMaker(instruct_pipe, model_name=model_name, **settings)


def _instruct_rse(pipe, *, instruct_model=None, **settings) -> CounterfactualMaker:
    from cyclex.counterfactuals.instruct import InstructRegionEditMaker, instruct_pipeline_for

    instruct_pipe, model_name = instruct_pipeline_for(pipe, instruct_model)
    return InstructRegionEditMaker(instruct_pipe, model_name=model_name, **settings)


def _causal(pipe, *, causal_model=None, num_inference_steps=None, guidance_scale=None, strength=None,
            **settings) -> CounterfactualMaker:
    """The engine hands every factory its tailored SD and DDIM settings; the causal maker uses none of them."""
    if causal_model is None:
        raise ValueError("variant 'causal' needs causal_model=DIR, a folder from `cyclex train-causal` "
                         "(cyclex explain --variant causal --causal-model DIR)")
    from cyclex.counterfactuals.causal import CausalCounterfactualMaker

    return CausalCounterfactualMaker.from_pretrained(causal_model, **settings)


BUILTIN_MAKERS: dict[str, MakerFactory] = {
    "ddim": _ddim,
    "nti": _nti,
    "negative-prompt": _negative_prompt,
    "direct": _direct,
    "rse": _rse,
    "instruct": _instruct,
    "instruct-rse": _instruct_rse,
    "causal": _causal,
}

_REGISTERED: dict[str, MakerFactory] = {}  # register_maker's additions (win over built-ins and plugins)
_PLUGINS: dict[str, MakerFactory] | None = None  # `cyclex.makers` entry points, read once


def register_maker(name: str, factory: MakerFactory) -> None:
    """Register `factory(pipe, **settings) -> CounterfactualMaker` under `name` (last one wins)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"maker name must be a non-empty string, got {name!r}")
    _REGISTERED[name.strip().lower()] = factory


def _plugins() -> dict[str, MakerFactory]:
    global _PLUGINS
    if _PLUGINS is None:
        from importlib.metadata import entry_points

        _PLUGINS = {}
        for entry in entry_points(group="cyclex.makers"):
            try:
                _PLUGINS[entry.name.strip().lower()] = entry.load()
            except Exception as err:  # one broken plugin must not take the built-in variants down
                logger.warning("cyclex.makers entry point %r (%s) failed to load, skipped: %s", entry.name, entry.value, err)
    return _PLUGINS


def _all_makers() -> dict[str, MakerFactory]:
    return {**BUILTIN_MAKERS, **_plugins(), **_REGISTERED}


def available_makers() -> tuple[str, ...]:
    return tuple(sorted(_all_makers()))


def get_maker_factory(name: str) -> MakerFactory:
    key = str(name).strip().lower()
    makers = _all_makers()
    if key not in makers:
        raise KeyError(f"unknown counterfactual variant {name!r}; registered: {', '.join(sorted(makers))}")
    return makers[key]


def create_maker(name: str, pipe, **settings) -> CounterfactualMaker:
    """Build the maker registered as `name` on a StableDiffusionPipeline (or what the variant takes)."""
    return get_maker_factory(name)(pipe, **settings)


__all__ = [
    "BUILTIN_MAKERS",
    "CounterfactualMaker",
    "CounterfactualOutput",
    "available_makers",
    "create_maker",
    "get_maker_factory",
    "register_maker",
]
