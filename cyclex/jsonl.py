"""Reading JSON-lines files (run results, phantom metadata) with errors that name file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = (), *,
               error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """One dict per non-blank line; `error` is raised for bad JSON, non-objects or missing `required` keys."""
    path = Path(path)
    rows = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            raise error(f"{path}:{number}: missing keys {missing} (a line needs {list(required)})")
        rows.append(row)
    return rows
