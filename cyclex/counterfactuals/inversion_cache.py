"""Cache of inversion results, per (image hash, prompt, checkpoint, settings).

Inverting is the expensive half of a diffusion counterfactual (null-text inversion is ~10x the cost
of sampling) and the engine asks for the same (image, source prompt) once per finding, the search
once per setting. Entries live in memory and, when a folder is given, on disk as safetensors files
(one per entry, written atomically). The folder must be a run folder owned by cyclex: the cache
refuses to write into a folder that holds images (the user's data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff", ".bmp"}


def image_hash(image: torch.Tensor) -> str:
    """sha256 of one image's float32 bytes and shape (any shape, e.g. (1, H, W))."""
    array = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(array.shape)).encode())
    digest.update(array.numpy().tobytes())
    return digest.hexdigest()


def inversion_key(image: torch.Tensor, prompt: str, checkpoint: str, settings: Mapping[str, Any]) -> str:
    """Cache key of one image's inversion: hash of (image, prompt, checkpoint, settings as JSON)."""
    payload = json.dumps(
        {"image": image_hash(image), "prompt": prompt, "checkpoint": checkpoint, "settings": settings},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class InversionCache:
    """In-memory LRU of inversion tensors, optionally backed by `folder/KEY.safetensors`.

    `hits` counts memory or disk hits, `disk_hits` the disk ones, `misses` the rest. Values are
    dicts of tensors (stored on the CPU).
    """

    def __init__(self, folder: str | Path | None = None, max_items: int = 512) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self._check_folder(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
        self.max_items = int(max_items)
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    @staticmethod
    def _check_folder(folder: Path) -> None:
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"inversion cache folder {folder} exists and is not a folder")
            images = [p.name for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES]
            if images:
                raise ValueError(
                    f"inversion cache folder {folder} holds images ({images[0]}, ...): give a run folder "
                    "(e.g. RUN/cache/inversions), never the folder of the user's images"
                )

    def clear(self) -> None:
        """Forget the entries held in memory (files on disk stay; they are keyed by content)."""
        self._memory.clear()

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or (self._path(key) is not None and self._path(key).exists())

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.exists():
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            self._remember(key, tensors)
            self.hits += 1
            self.disk_hits += 1
            return tensors
        self.misses += 1
        return None

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> None:
        stored = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        self._remember(key, stored)
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        meta = {k: json.dumps(v, default=str) for k, v in (metadata or {}).items()}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=str(path.parent))
        os.close(fd)
        try:
            save_file(stored, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _remember(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._memory[key] = tensors
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses, "entries": len(self._memory)}
