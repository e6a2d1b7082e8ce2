"""One writer per folder: an OS file lock (`fcntl.flock`) on FOLDER/.cyclex-run.lock, held for a run's life.

The kernel drops a flock when its holder exits, so a killed run never leaves the folder locked. The
lock file also records who holds it (pid, host, the process's start time, since when, command line)
so that a refusal can name the holder, and so that two cases the kernel cannot settle are handled:

- the lock is still held although the recorded process is dead on this host: a child forked by the
  run (a data-loader worker) inherited the open lock file and outlived it. The lock is stale; it is
  taken over by putting a fresh lock file in its place (under a short take-over lock, so that two
  processes never both take it over).
- the record names another host: whether that run still goes cannot be checked from here (and
  flock over a network file system may not reach that host), so the lock is reported, not broken,
  with the lock file to delete by hand once that run is known to be gone.

A clean release empties the record, so an empty record means "free". Where the file system has no
flock (some network mounts), the record alone decides: a live process or another host holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = ".cyclex-run.lock"
TAKEOVER_SUFFIX = ".takeover"
FRESH_SUFFIX = ".new"
# The holder writes its record right after locking; a reader seeing the lock held and no record waits this long.
_RECORD_WAIT_S = 2.0
_FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class FolderLockedError(RuntimeError):
    """Another live process (or a process on another host) holds the folder's lock; `holder` is its record."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown.

    Recorded with the pid so that a pid reused by an unrelated process is not taken for the holder.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after its last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def process_running(pid: int, start_time: int | None = None) -> bool:
    """Whether process `pid` runs on this host (zombies count as ended); with `start_time`, whether it is that one."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): os.kill is all we know
    if stat[stat.rfind(")") + 2:].split()[:1] == ["Z"]:
        return False
    return start_time is None or process_start_time(pid) in (None, start_time)


def _this_process() -> dict[str, Any]:
    return {
        "owner": "cyclex",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": process_start_time(os.getpid()),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }


def _read_record(fd: int) -> dict[str, Any] | None:
    """The holder record in the open lock file, None when empty or unreadable (being written, or not ours)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _write_record(fd: int, record: dict[str, Any] | None) -> None:
    os.ftruncate(fd, 0)
    if record is not None:
        os.pwrite(fd, (json.dumps(record, sort_keys=True) + "\n").encode(), 0)
    os.fsync(fd)


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in _FLOCK_UNSUPPORTED:
            return None
        raise


def describe_holder(record: dict[str, Any]) -> str:
    since = f" since {record['since']}" if record.get("since") else ""
    command = f" ({record['command']})" if record.get("command") else ""
    return f"pid {record.get('pid')} on host {record.get('host')!r}{since}{command}"


class FolderLock:
    """An exclusive lock on `folder` (a context manager; the folder must exist).

    acquire() raises FolderLockedError naming the folder and the holder when another live process
    (or another host) holds it; it takes over a stale lock of a dead process on this host (warning).
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None
        self._owner_pid: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._owner_pid == os.getpid()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> FolderLock:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        if not self.folder.is_dir():
            raise FileNotFoundError(f"cannot lock {self.folder}: not a folder")
        fd = self._lock()
        try:
            _write_record(fd, _this_process())
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._owner_pid = fd, os.getpid()
        return self

    def release(self) -> None:
        """Empty the record and unlock; a no-op in a forked child (the lock belongs to its parent)."""
        if not self.held:
            return
        fd, self._fd = self._fd, None
        try:
            _write_record(fd, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as err:  # unsupported flock or a vanished folder: closing releases what there is
            logger.debug("releasing %s: %s", self.path, err)
        finally:
            os.close(fd)

    # -- the decision ------------------------------------------------------------------------------
    def _lock(self) -> int:
        """Open and lock the lock file (or a fresh one put in place of a stale one); returns the locked descriptor."""
        for _ in range(5):  # a stale lock taken over by another process meanwhile: decide again on the new file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                locked = _try_flock(fd)
                record = _read_record(fd)
                deadline = time.monotonic() + _RECORD_WAIT_S
                while locked is False and record is None and time.monotonic() < deadline:
                    time.sleep(0.05)  # the holder is between flock and writing its record
                    locked, record = _try_flock(fd), _read_record(fd)
                self._refuse_if_held(locked, record)
            except BaseException:
                os.close(fd)
                raise
            if locked is None:
                logger.warning("%s: this file system has no flock; the lock is the pid record in %s only",
                               self.folder, self.path)
                return fd
            if locked:
                if record is not None:
                    logger.info("%s: the previous run (%s) ended without releasing its lock", self.folder,
                                describe_holder(record))
                return fd
            try:
                fresh = self._take_over(fd, record)
            finally:
                os.close(fd)  # the stale file's descriptor: replaced, or taken over by someone else
            if fresh is not None:
                return fresh
        raise FolderLockedError(f"{self.folder}: its lock {self.path} keeps changing hands; try again", {})

    def _refuse_if_held(self, locked: bool | None, record: dict[str, Any] | None) -> None:
        """Raise FolderLockedError unless the lock is free, or held only by the orphans of a dead run here."""
        if record is None:
            if locked is False:
                raise FolderLockedError(f"{self.folder} is locked by a process that did not record itself in "
                                        f"{self.path} (not a cyclex run?); wait for it to end", {})
            return
        if record.get("host") != socket.gethostname():
            raise FolderLockedError(
                f"{self.folder} is locked by a cyclex run on another machine: {describe_holder(record)}. "
                f"cyclex cannot check from here whether it still runs; once it is known to have ended, "
                f"delete {self.path} and start again", record)
        # alive while we hold the flock: its holder lost the flock, or flock is not enforced here
        if process_running(record["pid"], record.get("process_start")):
            raise FolderLockedError(f"{self.folder} is in use by another cyclex run: {describe_holder(record)}; "
                                    "wait for it to finish or stop it", record)

    def _take_over(self, fd: int, stale: dict[str, Any]) -> int | None:
        """Replace a lock file held by the orphans of a dead run with a fresh, locked one (None: it changed meanwhile)."""
        guard = os.open(self.path.with_name(self.path.name + TAKEOVER_SUFFIX), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                        0o666)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # held for milliseconds by whoever takes over
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # another process took it over first
                return None
            fresh_path = self.path.with_name(f"{self.path.name}.{os.getpid()}{FRESH_SUFFIX}")
            fresh = os.open(fresh_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fresh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.replace(fresh_path, self.path)
            except BaseException:
                os.close(fresh)
                fresh_path.unlink(missing_ok=True)
                raise
            logger.warning("%s: took over the stale lock of %s (that process has ended; a child it left "
                           "behind still held the lock file)", self.folder, describe_holder(stale))
            return fresh
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
            os.close(guard)


def is_lock_file(name: str, lock_name: str = LOCK_NAME) -> bool:
    """Whether a file name is one of FolderLock's: the lock, its take-over guard, a fresh lock being put in place."""
    if name in (lock_name, lock_name + TAKEOVER_SUFFIX):
        return True
    middle = name[len(lock_name) + 1:-len(FRESH_SUFFIX)] if name.endswith(FRESH_SUFFIX) else ""
    return name.startswith(lock_name + ".") and middle.isdigit()
