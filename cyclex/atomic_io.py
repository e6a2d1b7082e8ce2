"""Atomic file writes: a crash never leaves a half-written result behind.

Every writer goes to a temporary file in the target's folder, then `os.replace`s it (atomic on
POSIX). Files get the usual 0666 & ~umask mode, not mkstemp's 0600, so run folders can be shared.

A kill between the two leaves the temporary file behind: `.NAME.PID-XXXXXXXX.tmp` (PID the
writer's process id; older cyclex versions wrote `.NAME.XXXXXXXX.tmp`). `remove_stale_temp_files`
deletes such files once their writer has ended, so a later run cleans up after a killed one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cyclex.run_lock import process_running

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
# .NAME.PID-RANDOM.tmp (RANDOM: mkstemp's 8 characters); the PID part is missing in older cyclex's names
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?:(?P<pid>[0-9]+)-)?[a-z0-9_]{8}\.tmp$")
# Temp names without a pid (older cyclex; the label writers' NamedTemporaryFile): stale once this old.
_UNOWNED_TEMP_AGE_S = 3600.0


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(handle)` on a temporary file opened with `mode`, then move it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX)
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


def temp_file_target(name: str) -> str | None:
    """The file name an atomic write's temporary file `name` was going to become, None if it is not one."""
    match = _TEMP_NAME.match(name)
    return match["target"] if match else None


def is_stale_temp_file(path: str | os.PathLike, *, now: float | None = None) -> bool:
    """Whether `path` is an atomic write's temporary file whose writer has ended.

    The writer's pid is in the name: it ended when no such process runs on this host. A name without
    a pid (written by an older cyclex) counts as stale once it is an hour old.
    """
    path = Path(path)
    match = _TEMP_NAME.match(path.name)
    if match is None or path.is_symlink() or not path.is_file():
        return False
    if match["pid"] is not None:
        return int(match["pid"]) != os.getpid() and not process_running(int(match["pid"]))
    age = (time.time() if now is None else now) - path.stat().st_mtime
    return age > _UNOWNED_TEMP_AGE_S


def remove_stale_temp_files(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in `folder` (and below); returns them.

    Only files named like atomic_write's temporaries and whose writer has ended are touched; symlinked
    folders are not followed. Call it on folders cyclex owns, under their run lock.
    """
    root = Path(folder)
    removed = []
    for directory, subfolders, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if name.endswith(TEMP_SUFFIX) and is_stale_temp_file(path):
                path.unlink(missing_ok=True)
                removed.append(path)
        if not recursive:
            subfolders.clear()
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted writes in %s", len(removed), root)
    return removed
