"""The scratch folders of the benchmarks (benchmarks/.work/NAME): fresh by default, resumed only when safe.

Every benchmark starts from scratch (its folder is deleted) unless it is given `--resume`. A resume
keeps the earlier runs only when they were made with the same weights (sha256 of every model file
the benchmark uses) and the same cyclex version; otherwise it is refused with what differs, so a
figure is never stitched together from two sets of weights or two versions of the code. The
fingerprint is stored as `WORK/fingerprint.json` when the folder is (re)made.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FINGERPRINT_NAME = "fingerprint.json"


class StaleResumeError(RuntimeError):
    """--resume asked for a work folder made with other weights or another cyclex version."""


def weights_fingerprint(folders: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """{"cyclex_version", "git_commit" (information only), "weights": {file: sha256}} of the model folders."""
    from cyclex.provenance import cyclex_version, files_sha256, git_commit

    weights: dict[str, str] = {}
    for folder in folders:
        folder = Path(folder).resolve()
        weights.update({f"{folder.name}/{name}": digest for name, digest in files_sha256([folder], root=folder).items()})
    return {"cyclex_version": cyclex_version(), "git_commit": git_commit()["commit"], "weights": weights}


def prepare_work_folder(work: str | os.PathLike, fingerprint: dict[str, Any], *, resume: bool = False) -> Path:
    """Make `work` ready: emptied (default), or kept for `resume` when its stored fingerprint matches.

    Raises StaleResumeError when resuming a folder without a fingerprint, or one whose weights or
    cyclex version differ (the message lists the files and versions that changed).
    """
    work = Path(work)
    stamp = work / FINGERPRINT_NAME
    if resume and work.exists():
        if not stamp.is_file():
            raise StaleResumeError(f"--resume: {work} has no {FINGERPRINT_NAME}, so the weights and cyclex version "
                                   "of its runs are unknown; run without --resume to start fresh")
        stored = json.loads(stamp.read_text())
        changed = []
        if stored.get("cyclex_version") != fingerprint["cyclex_version"]:
            changed.append(f"cyclex version {stored.get('cyclex_version')} -> {fingerprint['cyclex_version']}")
        old, new = stored.get("weights", {}), fingerprint["weights"]
        changed += [f"weights {name}: {'missing' if name not in new else 'new' if name not in old else 'changed'}"
                    for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        if changed:
            raise StaleResumeError(f"--resume refused: {work} was made with other weights or code ("
                                   + "; ".join(changed) + "); run without --resume to start fresh")
        return work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stamp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return work
