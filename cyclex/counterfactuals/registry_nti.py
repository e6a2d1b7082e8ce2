"""Registers the inversion-based makers with the engine's maker registry.

Names: "nti" (`NullTextInversionMaker`), "negative-prompt" (`NegativePromptInversionMaker`),
"direct" (`DirectInversionMaker`). Factories import their module lazily, so importing this file is
cheap; `nti.py` and `fast_inversion.py` import it, and so should the registry itself for names that
are not module names ("negative-prompt").
"""

from __future__ import annotations

from cyclex.counterfactuals import register_maker


def _nti_factory(pipe, **settings):
    from cyclex.counterfactuals.nti import NullTextInversionMaker

    return NullTextInversionMaker(pipe, **settings)


def _negative_prompt_factory(pipe, **settings):
    from cyclex.counterfactuals.fast_inversion import NegativePromptInversionMaker

    return NegativePromptInversionMaker(pipe, **settings)


def _direct_factory(pipe, **settings):
    from cyclex.counterfactuals.fast_inversion import DirectInversionMaker

    return DirectInversionMaker(pipe, **settings)


register_maker("nti", _nti_factory)
register_maker("negative-prompt", _negative_prompt_factory)
register_maker("direct", _direct_factory)
