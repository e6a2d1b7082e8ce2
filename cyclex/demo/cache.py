"""Where the demo's models are cached: $CYCLEX_HOME/demo (CYCLEX_HOME defaults to ~/.cache/cyclex)."""

from __future__ import annotations

import os
from pathlib import Path


def cyclex_home() -> Path:
    return Path(os.environ.get("CYCLEX_HOME") or Path.home() / ".cache" / "cyclex").expanduser()


def demo_cache_dir() -> Path:
    return cyclex_home() / "demo"
