"""The demo's tiny weights shipped inside the package, so `make demo` needs no training.

`scripts/package_demo_weights.py` copies the cached demo models (built by
`scripts/train_demo_generators.py`, `scripts/train_phantom_classifier.py`, `scripts/build_demo_sd.py`)
into `cyclex/demo/weights/`, keeping only what inference needs and storing tensors as float16 to stay
small. At first use `install_packaged_assets()` copies them back into `$CYCLEX_HOME/demo` as float32
and records what it installed (`.packaged.json`), so a cyclex upgrade with new demo weights replaces
the copies it installed; whatever was built here is left alone, and anything not shipped is built by
its own builder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cyclex.atomic_io import write_bytes_atomic
from cyclex.demo.cache import demo_cache_dir

logger = logging.getLogger(__name__)

PACKAGED_DIR = Path(__file__).parent / "weights"
# asset folder (relative to $CYCLEX_HOME/demo) -> the file that proves the cached copy is complete
ASSETS: dict[str, str] = {
    "generators/clean": "cyclex_demo.json",
    "generators/shortcut": "cyclex_demo.json",
    "tailored/clean": "selection.json",
    "tailored/shortcut": "selection.json",
    "classifier": "config.json",
}
# Single files shipped beside the models. The demo's calibrated CF_Score thresholds: shipped so that
# every machine scores with the numbers the benchmarks used (recalibrating on the float16-rounded
# shipped VAE, or on another device, would give slightly different ones).
FILES: tuple[str, ...] = ("cf_thresholds.json",)
# Training-only content that inference never reads.
_SKIP_DIRS = {"dataset", "phantoms", "logs", "unet_train"}
_SKIP_FILES = {"optimizer.bin", "scheduler.bin"}


def _referenced_checkpoints(folder: Path) -> set[str]:
    selection = folder / "selection.json"
    if not selection.is_file():
        return set()
    data = json.loads(selection.read_text())
    return {v for k, v in data.items() if k != "metrics" and isinstance(v, str)}


def _wanted_files(folder: Path) -> Iterable[Path]:
    keep_checkpoints = _referenced_checkpoints(folder)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.name in _SKIP_FILES or path.name.startswith("random_states"):
            continue
        if any(part in _SKIP_DIRS for part in rel.parts):
            continue
        if rel.parts[0] == "checkpoints" and str(Path(*rel.parts[:2])) not in keep_checkpoints:
            continue
        yield rel


def _copy_tensors(src: Path, dst: Path, dtype) -> None:
    """Copy a safetensors file, casting floating tensors to `dtype` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata=metadata)


DUPLICATES_FILE = "packaged_duplicates.json"  # rel path -> rel path of an identical file shipped once


def _copy_folder(src: Path, dst: Path, dtype, *, dedupe: bool = False) -> None:
    """Copy the inference files of `src`; with `dedupe`, identical files are written once (a
    tailored folder's unet/ is also its best-PSNR checkpoint) and listed in DUPLICATES_FILE."""
    import hashlib

    seen: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for rel in _wanted_files(src):
        if rel.name == DUPLICATES_FILE:
            continue
        digest = hashlib.sha256((src / rel).read_bytes()).hexdigest()
        if dedupe and digest in seen:
            duplicates[str(rel)] = seen[digest]
            continue
        seen[digest] = str(rel)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix == ".safetensors":
            _copy_tensors(src / rel, target, dtype)
        else:
            shutil.copy2(src / rel, target)
    listed = src / DUPLICATES_FILE
    if listed.is_file():  # installing: recreate the files shipped once
        duplicates.update(json.loads(listed.read_text()))
        for rel, source in duplicates.items():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dst / source, dst / rel)
    elif duplicates:
        (dst / DUPLICATES_FILE).write_text(json.dumps(duplicates, indent=2, sort_keys=True) + "\n")


def package_assets(cache: Path | None = None, out: Path = PACKAGED_DIR) -> dict[str, int]:
    """Write the cached demo models into `out` as float16; returns bytes per asset."""
    import torch

    cache = cache or demo_cache_dir()
    sizes = {}
    for name, marker in ASSETS.items():
        src = cache / name
        if not (src / marker).is_file():
            raise FileNotFoundError(f"demo asset {name} is not built at {src} ({marker} missing); build it first")
        dst = out / name
        if dst.exists():
            shutil.rmtree(dst)
        _copy_folder(src, dst, torch.float16, dedupe=True)
        sizes[name] = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    for name in FILES:
        if not (cache / name).is_file():
            raise FileNotFoundError(f"demo file {name} is missing from {cache}; make it first (the demo search "
                                    "scorer writes cf_thresholds.json: `python -m benchmarks.search`)")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cache / name, out / name)
        sizes[name] = (out / name).stat().st_size
    return sizes


INSTALLED_FILE = ".packaged.json"  # in the cache: what was installed from the shipped weights


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's relative paths and file contents."""
    import hashlib

    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _needs_install(dst_marker: Path, shipped_digest: str, stamp: dict | None) -> bool:
    """Missing, or installed from shipped weights that have changed since (a cyclex upgrade) and not
    rebuilt locally after that (the cached marker is still the installed one). A locally built asset
    has no stamp and is never replaced."""
    if not dst_marker.is_file():
        return True
    if not stamp or stamp.get("shipped") == shipped_digest:
        return False
    return stamp.get("marker") == _digest(dst_marker)


def install_packaged_assets(cache: Path | None = None, packaged: Path | None = None) -> list[str]:
    """Copy shipped demo models (float32) and files into the cache when missing, or when the cached copy
    was installed from older shipped weights; returns the names installed."""
    import torch

    cache = cache or demo_cache_dir()
    packaged = packaged or PACKAGED_DIR
    stamps_path = cache / INSTALLED_FILE
    stamps = json.loads(stamps_path.read_text()) if stamps_path.is_file() else {}
    installed = []
    # (name, the file proving a complete copy, relative to the name's path); a single file proves itself
    items = [(name, Path(marker)) for name, marker in ASSETS.items()] + [(name, Path()) for name in FILES]
    for name, marker in items:
        src, dst = packaged / name, cache / name
        if not (src / marker).is_file():
            continue
        shipped = _digest(src)
        if not _needs_install(dst / marker, shipped, stamps.get(name)):
            continue
        if src.is_file():
            write_bytes_atomic(dst, src.read_bytes())
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
            _copy_folder(src, staging, torch.float32)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(staging, dst)  # atomic: a crash never leaves a half-copied asset behind
            logger.info("installed shipped demo model %s into %s", name, dst)
        stamps[name] = {"shipped": shipped, "marker": _digest(dst / marker)}
        installed.append(name)
    if installed:
        write_bytes_atomic(stamps_path, (json.dumps(stamps, indent=2, sort_keys=True) + "\n").encode())
    return installed
