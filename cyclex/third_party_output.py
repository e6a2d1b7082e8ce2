"""Third-party noise off by default on the command line (`cyclex --verbose ...` keeps it).

diffusers' "Loading pipeline components" and transformers' "Loading weights" bars are tqdm bars, and
both libraries log advisory warnings per batch (attention masks, deprecations). cyclex shows its own
progress (one rich bar per long stage) and a summary, so by default the CLI switches these off through
the libraries' documented environment variables, read when they are first imported: the CLI sets
them before any command imports a model library. A variable the user set is kept as is.
"""

from __future__ import annotations

import os
import warnings

QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",  # tqdm >= 4.66 reads TQDM_* defaults: diffusers' and transformers' loading bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_third_party_output() -> dict[str, str]:
    """Set the quiet variables the user has not set; returns those it set."""
    changed = {}
    for name, value in QUIET_ENVIRONMENT.items():
        if name not in os.environ:
            os.environ[name] = value
            changed[name] = value
    for module in ("diffusers", "transformers"):  # deprecation notices of the libraries, not of cyclex
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{module}(\.|$)")
    return changed
