"""What a run folder's resume key knows of a generator beyond its spec string: its weights.

A spec names where a generator is, not what it is: ``hf:/models/clean`` retrained in place, or an
R2Gen checkpoint replaced by a fixed one, keeps its spec. `generator_version` gives the value
`cyclex explain` records in run_config.json (so a resume with other weights is refused, naming
``generator_version``):

- an explicit version (``--generator-version``, for ``python:`` callables whose code changed);
- ``hf:LOCAL_FOLDER``: ``sha256:`` over the folder's weight files (*.safetensors, *.bin, *.pt,
  *.pth, *.ckpt) and its top-level JSON configs (generation_config.json changes the reports);
- ``r2gen:`` / ``r2gencmn:``: ``sha256:`` over the checkpoint and the annotation file (R2Gen
  builds its vocabulary from the annotation);
- anything else (hub ids, ``python:`` without a version, ``demo:``, whose weights ship with the
  cyclex version): None, the spec alone keys the resume as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cyclex.provenance import file_sha256, files_sha256

OPTIONS_SEPARATOR = "::"


def _digest(fingerprints: dict[str, str]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(spec: str) -> str | None:
    """sha256 over the local weight files a hf: / r2gen: spec loads, None when the spec names none."""
    kind, _, body = spec.strip().partition(":")
    parts = body.split(OPTIONS_SEPARATOR)
    if kind == "hf":
        folder = Path(parts[0]).expanduser()
        if not folder.is_dir():
            return None  # a hub id: the hub's revision, not a file here
        found = files_sha256([folder], root=folder)
        found.update({p.name: file_sha256(p) for p in sorted(folder.glob("*.json")) if p.is_file()})
        return _digest(found) if found else None
    if kind in ("r2gen", "r2gencmn") and len(parts) >= 3:
        files = [Path(parts[1]).expanduser(), Path(parts[2]).expanduser()]
        if not all(path.is_file() for path in files):
            return None  # load_generator names the missing file
        return _digest({role: file_sha256(path) for role, path in zip(("checkpoint", "annotation"), files,
                                                                       strict=True)})
    return None


def generator_version(spec: str, explicit: str | None = None) -> str | None:
    """The version recorded for the generator of `spec`: `explicit` when given, else its weights' sha256."""
    if explicit is not None:
        if not explicit.strip():
            raise ValueError("--generator-version must be a non-empty text (e.g. a git commit or a date)")
        return explicit.strip()
    return weights_fingerprint(spec)
