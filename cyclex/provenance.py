"""What made a number: cyclex version and commit, library versions, device, date, and the scorers.

Every run summary, evaluation, HTML page and benchmark JSON carries `environment()` and a
description of each scorer behind its figures, so a reader can tell a real LPIPS / CLIP / classifier
figure from a stand-in's:

- `environment(device)`: cyclex version, git commit ("unknown" outside a checkout, never an error),
  whether the checkout had uncommitted changes, torch / diffusers / transformers / numpy / python
  versions, the device, the UTC date;
- `file_sha256`, `files_sha256`: fingerprints of weight files (what `describe_scorer` and the
  benchmarks' resume check use);
- `describe_scorer(obj, role)`: the description an object carries (`obj.provenance`, set by whoever
  loaded it, e.g. `cyclex.specs.scorers`), else its class and a sha256 of its in-memory weights;
- `frame_threshold_rule(setting, normalize)`: the frame threshold L as a sentence, including the
  fallback a per-finding calibration uses for findings it lacks;
- `run_provenance(settings)`: what a run folder's summary.json records (environment, the labeler
  that decides the cycle, the frame-threshold rule, the search's scorers when it searched).

Core layer: imports nothing of cyclex's above `cyclex.findings`; torch and the libraries are read lazily.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "STAND_IN_LPIPS",
    "STAND_IN_ENCODER",
    "UNKNOWN",
    "cyclex_version",
    "git_commit",
    "library_versions",
    "device_description",
    "environment",
    "file_sha256",
    "files_sha256",
    "module_weights_sha256",
    "describe_scorer",
    "frame_threshold_rule",
    "run_provenance",
]

UNKNOWN = "unknown"
# How a stand-in is named wherever its numbers appear (issue 16): the phantom world has no LPIPS / CLIP weights.
STAND_IN_LPIPS = "stand-in: phantom-classifier features"
STAND_IN_ENCODER = "stand-in: phantom-classifier features (the CPG classifier's penultimate layer, not CLIP)"
_LIBRARIES = ("torch", "diffusers", "transformers", "numpy")
_PACKAGE_DIR = Path(__file__).resolve().parent


def cyclex_version() -> str:
    """The installed distribution's version, else the package's `__version__`."""
    try:
        return importlib.metadata.version("cyclex")
    except importlib.metadata.PackageNotFoundError:
        from cyclex import __version__

        return __version__


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"commit": hash or "unknown", "dirty": bool or None} of the checkout holding `path` (default: cyclex).

    "unknown" when cyclex runs from an installed copy, git is missing or the folder is no checkout.
    dirty: tracked files differ from the commit (uncommitted changes), None when unknown.
    """
    where = Path(path) if path is not None else _PACKAGE_DIR
    where = where if where.is_dir() else where.parent
    commit = _git("rev-parse", "HEAD", cwd=where)
    if not commit:
        return {"commit": UNKNOWN, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=where)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def library_versions() -> dict[str, str]:
    """Versions of torch, diffusers, transformers, numpy and python ("not installed" when absent)."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def device_description(device: Any = None) -> str:
    """'cpu (N threads)' or 'cuda:0 (NVIDIA ...)'; device: a torch device or its name, None = cpu."""
    name = str(device) if device is not None else "cpu"
    if name.startswith("cuda"):
        try:
            import torch

            index = int(name.split(":")[1]) if ":" in name else 0
            return f"{name} ({torch.cuda.get_device_name(index)})"
        except (ImportError, RuntimeError, AssertionError, ValueError):
            return name
    if name == "cpu":
        try:
            import torch

            return f"cpu ({torch.get_num_threads()} threads, {platform.machine() or 'unknown machine'})"
        except ImportError:
            return "cpu"
    return name


def environment(device: Any = None) -> dict[str, Any]:
    """cyclex version, git commit, library versions, device and UTC date of this process."""
    commit = git_commit()
    return {
        "cyclex_version": cyclex_version(),
        "git_commit": commit["commit"],
        "git_dirty": commit["dirty"],
        "versions": library_versions(),
        "device": device_description(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> dict[str, str]:
    """{path (relative to root when given): sha256} of every file; folders contribute their weight files.

    Weight files: *.safetensors, *.bin, *.pt, *.pth, *.ckpt (configs change nothing a scorer computes).
    """
    suffixes = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
    found: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes) if path.is_dir() else [path]
        for file in files:
            key = os.path.relpath(file, root) if root is not None else str(file)
            found[key] = file_sha256(file)
    return found


def module_weights_sha256(module: Any) -> str | None:
    """sha256 over a torch module's state dict (names, dtypes, shapes, bytes), None for a non-module."""
    state_dict = getattr(module, "state_dict", None)
    if not callable(state_dict):
        return None
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def describe_scorer(scorer: Any, role: str) -> dict[str, Any] | None:
    """The description of one scorer (role: "lpips", "clip_encoder", "cpg_classifier", ...).

    An object loaded by `cyclex.specs.scorers` or the demo carries `provenance` (a dict: name,
    weights, weights_sha256, stand_in); any other object is described by its class and a sha256 of
    the weights it holds in memory (its `net` or `model` module). None: no scorer in that role.
    """
    if scorer is None:
        return None
    carried = getattr(scorer, "provenance", None)
    if isinstance(carried, Mapping):
        # one object may serve several roles (the phantom classifier is the demo's classifier and encoder)
        by_role = dict(carried.get("roles", {}).get(role, {}))
        return {"role": role, **{k: v for k, v in carried.items() if k != "roles"}, **by_role}
    module = next((getattr(scorer, name) for name in ("net", "model") if hasattr(scorer, name)), scorer)
    return {"role": role, "name": f"{type(scorer).__module__}.{type(scorer).__qualname__}",
            "weights": None, "weights_sha256": None, "in_memory_weights_sha256": module_weights_sha256(module),
            "stand_in": None}


def frame_threshold_rule(setting: Any, normalize: bool = False, candidates: Iterable[float] | None = None,
                         findings: Iterable[str] | None = None, default: float = 95.0) -> str:
    """The frame threshold L of a run as a sentence (seed 003: 95 +- 10 on a 0-255 scale).

    setting: "stable", a number, or {finding: L} (calibrated). findings: the vocabulary, to name
    the findings a calibration lacks (they get `default`, the explainer's fallback).
    """
    stretch = "; |I - CF| stretched to a maximum of 255 first" if normalize else ""
    if isinstance(setting, str):
        levels = ", ".join(f"{float(c):g}" for c in (candidates or (85, 90, 95, 100, 105)))
        return f"{setting}: per item, the most stable L of {{{levels}}} on 0-255 (seed 003's 95 +- 10){stretch}"
    if isinstance(setting, Mapping):
        calibrated = ", ".join(f"{k} {float(v):g}" for k, v in sorted(setting.items()))
        missing = sorted(set(findings or ()) - set(setting))
        fallback = f"; not calibrated, so L = {default:g}: {', '.join(missing)}" if missing else ""
        return f"calibrated per finding: {calibrated}{fallback}{stretch}"
    return f"fixed L = {float(setting):g} on 0-255{stretch}"


def run_provenance(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance of a run from its settings (run_config.json): `environment()` plus its scorers.

    The Cyclic Rate is decided by the labeler reading the regenerated report; frames by the
    frame-threshold rule; a search also by its CF_Score scorers (`settings["scorers"]`, which
    `CounterfactualScorer.describe` gave when the run started).
    """
    from cyclex.findings import ABNORMALITIES

    scorers: dict[str, Any] = {
        "labeler": {"role": "labeler", "name": settings.get("labeler"),
                    "note": "decides the cycle: is the removed finding gone from the regenerated report"},
        "frame_threshold": {"role": "frame_threshold",
                            "rule": frame_threshold_rule(settings.get("frame_threshold", "stable"),
                                                         bool(settings.get("frame_normalize")),
                                                         settings.get("frame_candidates"), ABNORMALITIES)},
    }
    if settings.get("scorers"):
        scorers["cf_score"] = settings["scorers"]
    return {**environment(settings.get("device")), "scorers": scorers}
