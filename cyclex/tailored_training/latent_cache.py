"""VAE latents of the training images, encoded once into a folder and trained from (STYLE rule 19).

diffusers' SDXL text-to-image example encodes the latents before training: the VAE then never runs in
the loop, and a 100k-step run reads (N, 4, R/8, R/8) tensors instead of decoding PNGs. With
`TailoredTrainingConfig.latent_cache_dir` set, `train_tailored` keeps them on disk::

    CACHE/latent_cache.json            format, resolution, the VAE's weights sha256, ids, shard size
    CACHE/latents-000000.safetensors   "latents" (n, C, h, w) float32 of rows [0, shard_size), ...

Encoding is resumable and split between processes: shard k is encoded by process k mod N, each
written atomically and skipped when already there with the same ids, so a killed encode (or a
second run, or another process count) redoes only missing shards. The cache is refused when its
resolution, VAE or ids differ from the run's (a stale cache would train on other images). Shards are
encoded in chunks of `ENCODE_CHUNK` aligned with the in-memory path's chunks, so cached and
in-memory latents are the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from cyclex.atomic_io import atomic_write, write_json_atomic

CACHE_FORMAT = "cyclex-latent-cache"
CACHE_VERSION = 1
META_NAME = "latent_cache.json"
ENCODE_CHUNK = 32  # images per VAE call, as train._encode_rows
DEFAULT_SHARD_SIZE = 1024  # a multiple of ENCODE_CHUNK


class LatentCacheMismatch(ValueError):
    """The latent cache folder holds latents of other images, another resolution or another VAE."""


def shard_path(folder: Path, number: int) -> Path:
    return Path(folder) / f"latents-{number:06d}.safetensors"


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode("utf-8", "surrogatepass")).hexdigest()


def cache_meta(rows: Sequence[dict], resolution: int, vae_sha256: str, shard_size: int) -> dict:
    return {"format": CACHE_FORMAT, "format_version": CACHE_VERSION, "resolution": int(resolution),
            "vae_sha256": vae_sha256, "shard_size": int(shard_size), "n": len(rows),
            "ids_sha256": _ids_digest([r["id"] for r in rows]), "ids": [str(r["id"]) for r in rows]}


def prepare_latent_cache(folder: str | Path, rows: Sequence[dict], resolution: int, vae_sha256: str,
                         shard_size: int = DEFAULT_SHARD_SIZE) -> dict:
    """Write CACHE/latent_cache.json (main process, before anyone encodes), or check the one there.

    LatentCacheMismatch names what differs when the folder holds another cache.
    """
    if shard_size < 1 or shard_size % ENCODE_CHUNK:
        raise ValueError(f"latent cache shard_size must be a positive multiple of {ENCODE_CHUNK}, got {shard_size}")
    folder = Path(folder)
    meta = cache_meta(rows, resolution, vae_sha256, shard_size)
    path = folder / META_NAME
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LatentCacheMismatch(f"{path} is not readable JSON ({err}); delete {folder} to encode again") from err
        differs = [k for k in ("format", "format_version", "resolution", "vae_sha256", "shard_size", "ids_sha256")
                   if previous.get(k) != meta[k]]
        if differs:
            raise LatentCacheMismatch(f"latent cache {folder} was made with other {', '.join(differs)} than this run "
                                      "(other images, resolution or VAE); use another latent_cache_dir or delete it")
        return previous
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, meta)
    return meta


def encode_latent_shards(vae, images, folder: str | Path, meta: dict, *, device, encode,
                         process_index: int = 0, num_processes: int = 1) -> list[int]:
    """Encode the shards of this process (k mod num_processes == process_index) that are missing.

    images: a dataset whose item i has "pixel_values" (1, R, R) of row i; encode(vae, batch) -> latents.
    Returns the shard numbers encoded now.
    """
    from safetensors import safe_open

    folder = Path(folder)
    size, ids = meta["shard_size"], meta["ids"]
    encoded = []
    for number, start in enumerate(range(0, len(ids), size)):
        if number % num_processes != process_index:
            continue
        shard_ids = ids[start:start + size]
        path = shard_path(folder, number)
        if path.is_file():
            with safe_open(str(path), "pt") as handle:
                if (handle.metadata() or {}).get("ids_sha256") == _ids_digest(shard_ids):
                    continue
        chunks = []
        for chunk_start in range(start, start + len(shard_ids), ENCODE_CHUNK):
            stop = min(chunk_start + ENCODE_CHUNK, start + len(shard_ids))
            batch = torch.stack([images[i]["pixel_values"] for i in range(chunk_start, stop)])
            chunks.append(encode(vae, batch.to(device)).float().cpu())
        latents = torch.cat(chunks).contiguous()
        atomic_write(path, lambda handle, latents=latents, shard_ids=shard_ids: handle.write(
            _safetensors_bytes(latents, {"ids_sha256": _ids_digest(shard_ids)})))
        encoded.append(number)
    return encoded


def _safetensors_bytes(latents: torch.Tensor, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save({"latents": latents}, metadata=metadata)


def load_latent_cache(folder: str | Path, meta: dict) -> torch.Tensor:
    """All latents (N, C, h, w) float32 in row order; FileNotFoundError naming a missing shard."""
    from safetensors.torch import load_file

    folder = Path(folder)
    parts = []
    for number in range(-(-meta["n"] // meta["shard_size"])):
        path = shard_path(folder, number)
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {folder}: shard {path.name} is missing (an encode was interrupted; "
                                    "run the training again to finish it)")
        parts.append(load_file(str(path))["latents"])
    latents = torch.cat(parts)
    if latents.shape[0] != meta["n"]:
        raise LatentCacheMismatch(f"latent cache {folder} holds {latents.shape[0]} latents for {meta['n']} images")
    return latents
