"""JSON lines and JSON-safe values: reading run results / phantom metadata with errors that name file
and line, and one cleaner that turns numbers, arrays, dataclasses and paths into standard JSON values."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["read_jsonl", "to_json_safe"]


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = (), *,
               error: type[Exception] = ValueError, skip_unreadable: bool = False) -> list[dict[str, Any]]:
    """One dict per non-blank line; `error` is raised for bad JSON, non-objects or missing `required` keys.

    skip_unreadable: log a warning and skip lines that are not valid JSON instead of raising (for
    append-only caches, where a crash mid-write leaves a torn line behind).
    """
    path = Path(path)
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                    "expected JSON lines as cyclex writes them") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            if skip_unreadable:
                logger.warning("skipping unreadable line %d of %s (interrupted write?)", number, path)
                continue
            raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            raise error(f"{path}:{number}: missing keys {missing} (a line needs {list(required)})")
        rows.append(row)
    return rows


def to_json_safe(value: Any) -> Any:
    """A copy of `value` that `json.dumps` writes as standard JSON.

    Mappings -> dicts with str keys, tuples / lists / numpy arrays -> lists, dataclass instances ->
    dicts, numpy scalars -> Python numbers, NaN / inf -> None (standard JSON has neither), paths ->
    str; anything else is returned as it is (str, int, bool, None ...).
    """
    if isinstance(value, float):  # np.float64 included (a float subclass)
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if is_dataclass(value) and not isinstance(value, type):
        return to_json_safe(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value
