"""Which folders are cyclex run folders, which files in them cyclex wrote, and who may write there now.

A run folder proves it is one with a marker cyclex writes when it starts the run::

    RUN/.cyclex-run.json   {"format": "cyclex-run", "format_version": 1, "run_id": "<32 hex>",
                            "created": "<UTC time>", "cyclex_version": "..."}
    RUN/.cyclex-run.lock   the run lock (`cyclex.run_lock`): pid and host of the run writing now

`--overwrite` deletes only the files a run folder is made of (`RUN_FILE_PATTERNS`: what the run,
`cyclex report`, `cyclex evaluate` and the search maker write, and their atomic-write temporaries),
never follows a symlink, and keeps (and lists) anything else. A folder without a valid marker is
never emptied, with one exception for run folders of cyclex versions before the marker: a valid
`run_config.json` of ours, and nothing in the folder but files of a run folder. Those resume (and
get their marker) like any run folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cyclex.atomic_io import temp_file_target, write_json_atomic
from cyclex.run_lock import LOCK_NAME, FolderLock, FolderLockedError, is_lock_file

logger = logging.getLogger(__name__)

MARKER_NAME = ".cyclex-run.json"
MARKER_FORMAT = "cyclex-run"
MARKER_VERSION = 1
CONFIG_NAME = "run_config.json"
# Keys every run_config.json of cyclex holds (run_explainer's own settings): how a run folder made
# before the marker existed is told from a stranger's folder that happens to hold a run_config.json.
LEGACY_CONFIG_KEYS = ("batch_size", "findings", "image_size", "images", "variant")

# The files of a run folder, as paths relative to it: run_folder.py's layout, report_html's page,
# evaluate_run's metrics and figures, the search maker's logs, the list of skipped images, the ranks' shard files.
RUN_FILE_PATTERNS = tuple(re.compile(p) for p in (
    r"run_config\.json", r"explain_settings\.json", r"results\.jsonl", r"summary\.json", r"skipped\.jsonl", r"index\.html",
    r"metrics\.jsonl", r"search_attempts\.jsonl", r"search_ablation\.json",
    r"items/[^/]+/[^/]+/[^/]+\.(?:png|npy)",
    r"records/[^/]+/[^/]+\.json",
    r"figures/[^/]+\.png",
    # a distributed run's ranks (cycle/distributed.py): their failed images, their scopes, their done markers
    r"shards/(?:skipped\.rank-[0-9]+\.jsonl|scope\.rank-[0-9]+\.json|done\.rank-[0-9]+\.json"
    r"|search_attempts\.rank-[0-9]+\.jsonl)",
))
RUN_FOLDER_PATTERNS = tuple(re.compile(p) for p in (
    r"items", r"items/[^/]+", r"items/[^/]+/[^/]+", r"records", r"records/[^/]+", r"figures", r"shards",
))
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RunFolderError(RuntimeError):
    """The output folder holds a run made with different settings (or is not a run folder)."""


class RunFolderBusy(RunFolderError):
    """Another live cyclex run writes into the folder (`holder`: its pid, host, since when)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class RunFolderState:
    """What `out` is: "new" (absent, or empty), "marked" (a run folder), "legacy" (one made before the marker)."""

    kind: str
    marker: dict[str, Any] | None = None


# -- the marker -------------------------------------------------------------------------------------
def read_marker(out: str | os.PathLike) -> dict[str, Any]:
    """The validated marker of run folder `out`; RunFolderError naming the file and what is wrong otherwise."""
    path = Path(out) / MARKER_NAME
    refuse = f"{Path(out)} is not treated as a cyclex run folder; choose another --out"
    if path.is_symlink() or not path.is_file():
        raise RunFolderError(f"{path} is not a regular file (cyclex writes its run marker as one); {refuse}")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path} is not a readable JSON run marker ({err}); {refuse}") from None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise RunFolderError(f"{path}: expected a JSON object with \"format\": \"{MARKER_FORMAT}\"; {refuse}")
    version = marker.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunFolderError(f"{path}: \"format_version\" must be a positive integer, got {version!r}; {refuse}")
    if version > MARKER_VERSION:
        raise RunFolderError(f"{path}: made by a newer cyclex (run folder format {version}; this one reads up to "
                             f"{MARKER_VERSION}): upgrade cyclex or choose another --out")
    if not isinstance(marker.get("run_id"), str) or not _RUN_ID.match(marker["run_id"]):
        raise RunFolderError(f"{path}: \"run_id\" must be 32 hex digits, got {marker.get('run_id')!r}; {refuse}")
    return marker


def write_marker(out: str | os.PathLike) -> dict[str, Any]:
    """Mark `out` as a cyclex run folder with a new run id; returns the marker."""
    from cyclex import __version__

    marker = {
        "format": MARKER_FORMAT,
        "format_version": MARKER_VERSION,
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cyclex_version": __version__,
    }
    write_json_atomic(Path(out) / MARKER_NAME, marker)
    return marker


def _legacy_config_problem(path: Path) -> str | None:
    """Why `path` is not a run_config.json of cyclex, None when it is one."""
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"it is not readable JSON ({err})"
    if not isinstance(config, dict):
        return f"it holds a JSON {type(config).__name__}, not an object"
    missing = [k for k in LEGACY_CONFIG_KEYS if k not in config]
    return f"it lacks the settings {', '.join(missing)}" if missing else None


def inspect_run_folder(out: str | os.PathLike) -> RunFolderState:
    """Classify `out` without writing anything; RunFolderError when cyclex must not write into it."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return RunFolderState("new")
    if not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder; refusing to write a run there")
    if (out / MARKER_NAME).exists() or (out / MARKER_NAME).is_symlink():
        return RunFolderState("marked", read_marker(out))
    entries = [p for p in out.iterdir() if not is_lock_file(p.name)]
    if not entries:
        return RunFolderState("new")
    config = out / CONFIG_NAME
    if not (config.exists() or config.is_symlink()):
        raise RunFolderError(f"{out} exists, is not empty and is not a cyclex run folder (no {MARKER_NAME} or "
                             f"{CONFIG_NAME}); refusing to write into it")
    problem = _legacy_config_problem(config)
    if problem:
        raise RunFolderError(f"{out} exists, is not empty and is not a cyclex run folder: it has no {MARKER_NAME}, "
                             f"and {config} is not a cyclex run configuration ({problem}); refusing to write into it")
    return RunFolderState("legacy")


# -- the files cyclex wrote ---------------------------------------------------------------------------
def _is_run_file(relative: str) -> bool:
    """A run folder's file, or the temporary file of an interrupted atomic write of one."""
    if any(p.fullmatch(relative) for p in RUN_FILE_PATTERNS):
        return True
    folder, _, name = relative.rpartition("/")
    target = temp_file_target(name)
    if target is None:
        return False
    return any(p.fullmatch(f"{folder}/{target}" if folder else target) for p in RUN_FILE_PATTERNS)


def scan_run_folder(out: str | os.PathLike) -> tuple[list[Path], list[Path], list[Path]]:
    """(files cyclex wrote, their folders deepest first, everything else) in run folder `out`.

    The marker and the lock files are in none of the lists (the run keeps them). Symlinks are never
    followed and always count as "everything else"; so do unknown folders (not looked into).
    """
    root = Path(out)
    files, folders, foreign = [], [], []
    for directory, subfolders, names in os.walk(root):
        here = Path(directory)
        relative_dir = here.relative_to(root).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        for name in list(subfolders):
            path = here / name
            if path.is_symlink() or not any(p.fullmatch(prefix + name) for p in RUN_FOLDER_PATTERNS):
                foreign.append(path)
                subfolders.remove(name)
            else:
                folders.append(path)
        for name in names:
            path = here / name
            if not prefix and (name == MARKER_NAME or is_lock_file(name)):
                continue
            if path.is_symlink() or not _is_run_file(prefix + name):
                foreign.append(path)
            else:
                files.append(path)
    folders.sort(key=lambda p: len(p.parts), reverse=True)
    return files, folders, sorted(foreign)


def _listing(paths: list[Path], root: Path, limit: int = 5) -> str:
    shown = ", ".join(str(p.relative_to(root)) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def remove_run_files(out: str | os.PathLike, state: RunFolderState) -> list[Path]:
    """Delete the files cyclex wrote in run folder `out` (for --overwrite); returns what was kept.

    A legacy folder (no marker) is emptied only when it holds nothing but run-folder files, and a
    symlink named like a run folder's file or folder (RUN/items ...) is refused: the new run would
    write through it or read it as a result.
    """
    root = Path(out)
    if state.kind not in ("marked", "legacy"):
        raise RunFolderError(f"{root} is not a cyclex run folder; --overwrite empties only those")
    files, folders, foreign = scan_run_folder(root)
    # a linked folder would take the new run's files elsewhere, a linked record would be read as a result
    where_the_run_writes = RUN_FILE_PATTERNS + RUN_FOLDER_PATTERNS
    in_the_way = [p for p in foreign if p.is_symlink()
                  and any(q.fullmatch(p.relative_to(root).as_posix()) for q in where_the_run_writes)]
    if in_the_way:
        raise RunFolderError(f"{root}: {_listing(in_the_way, root)} is a symlink where the run keeps its files; "
                             "cyclex neither deletes nor writes through links: remove it by hand or choose another "
                             "--out")
    if state.kind == "legacy" and foreign:
        raise RunFolderError(
            f"{root} looks like a run folder of an earlier cyclex (a {CONFIG_NAME}, no {MARKER_NAME}) but also holds "
            f"files cyclex does not write: {_listing(foreign, root)}. --overwrite empties only folders it can prove "
            f"are its own: delete {root} by hand (or move those files out) and run again, or choose another --out")
    for path in files:
        path.unlink(missing_ok=True)
    for folder in folders:  # deepest first; a folder still holding someone else's files stays
        try:
            folder.rmdir()
        except OSError:
            pass
    if foreign:
        logger.warning("%s: --overwrite kept %d entries cyclex did not write: %s", root, len(foreign),
                       _listing(foreign, root))
    logger.info("%s: removed %d files of the previous run", root, len(files))
    return foreign


# -- one writer at a time -----------------------------------------------------------------------------
@contextmanager
def locked_run_folder(out: str | os.PathLike):
    """Hold the run lock of `out` (made if absent) for the block; RunFolderBusy when another run holds it.

    Refuses (RunFolderError) before writing anything when `out` is a folder cyclex must not write into.
    Re-entrant within one process (a report written while the run holds its lock), never across processes.
    """
    out = Path(out)
    try:
        inspect_run_folder(out)
    except RunFolderError:
        _refuse_if_another_run_is_starting(out)
        raise
    out.mkdir(parents=True, exist_ok=True)
    key = (os.getpid(), out.resolve())
    held = _HELD_BY_THIS_PROCESS.get(key)
    if held is not None:
        yield held
        return
    lock = FolderLock(out)
    try:
        lock.acquire()
    except FolderLockedError as err:
        raise RunFolderBusy(f"{err}; refusing a second writer into the same run folder", err.holder) from err
    _HELD_BY_THIS_PROCESS[key] = lock
    try:
        yield lock
    finally:
        del _HELD_BY_THIS_PROCESS[key]
        lock.release()


def _refuse_if_another_run_is_starting(out: Path) -> None:
    """RunFolderBusy when a live run holds the lock of `out`: a run that has locked its folder but not yet
    written its marker leaves files a second writer must not read as "not a run folder"."""
    if not (out / LOCK_NAME).is_file():
        return  # no lock file: nothing is starting here, and probing would write one into a foreign folder
    probe = FolderLock(out)
    try:
        probe.acquire()
    except FolderLockedError as err:
        raise RunFolderBusy(f"{err}; refusing a second writer into the same run folder", err.holder) from err
    probe.release()


# (pid, resolved folder) -> the lock this process holds on it; the pid keeps a forked child from reusing its parent's
_HELD_BY_THIS_PROCESS: dict[tuple[int, Path], FolderLock] = {}
