"""Atomic file writes: a crash never leaves a half-written result behind.

Every writer goes to a temporary file in the target's folder, then `os.replace`s it (atomic on
POSIX). Files get the usual 0666 & ~umask mode, not mkstemp's 0600, so run folders can be shared.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(handle)` on a temporary file opened with `mode`, then move it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda h: h.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda h: h.write(text), "w")


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = True) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def write_png_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """uint8 (H, W) or (H, W, 3), or float (H, W) in [0, 1], as a PNG."""
    from PIL import Image

    if array.dtype != np.uint8:
        array = np.uint8(np.clip(np.asarray(array, np.float32), 0, 1) * 255 + 0.5)
    return atomic_write(path, lambda h: Image.fromarray(array).save(h, format="PNG"))


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    return atomic_write(path, lambda h: np.save(h, np.asarray(array, np.float32)))
