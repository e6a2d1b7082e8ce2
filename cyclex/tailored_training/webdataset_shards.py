"""WebDataset tar shards as an input of tailored training (optional; a manifest.jsonl is the default).

A shard is a plain POSIX tar in the WebDataset layout: the files of one sample share a key (the name
up to the first dot) and follow each other, here `KEY.png` (the image) and `KEY.json` (the manifest
row without "image": id, prompt, report, labels ...). `write_webdataset_shards(manifest, folder)`
makes them from a manifest; `train_tailored` and `accelerate launch -m cyclex.tailored_training
--manifest` take a shard, a folder of shards, or a brace pattern (`train-{000000..000009}.tar`).

The shards are read map-style (an index of each sample's members, built once per process by reading
the tar headers, then random access), not streamed: training keeps its `EpochShuffleSampler` order,
which is a fixed function of (seed, epoch), so the exact resume of a manifest run holds unchanged.
The `webdataset` library is not needed; shards it writes (or reads) are the same files.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from cyclex.atomic_io import atomic_write

SHARD_SUFFIX = ".tar"
IMAGE_SUFFIXES = ("png", "jpg", "jpeg")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_webdataset_source(source: str | Path) -> bool:
    """Whether `source` names tar shards: a .tar file, a brace pattern of them, or a folder holding only shards."""
    text = str(source)
    if _BRACES.search(text) and text.endswith(SHARD_SUFFIX):
        return True
    path = Path(text)
    if path.is_file():
        return path.suffix == SHARD_SUFFIX
    return path.is_dir() and not (path / "manifest.jsonl").is_file() and any(path.glob(f"*{SHARD_SUFFIX}"))


def shards_folder(source: str | Path) -> Path:
    """The folder the shards of `source` lie in (where their dataset.json is)."""
    path = Path(str(source))
    return path if path.is_dir() else path.parent


def expand_shards(source: str | Path) -> list[Path]:
    """The shard files of `source` in order; FileNotFoundError naming the first missing one."""
    text = str(source)
    match = _BRACES.search(text)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        paths = [Path(text[:match.start()] + str(n).zfill(width) + text[match.end():])
                 for n in range(int(first), int(last) + 1)]
    elif Path(text).is_dir():
        paths = sorted(Path(text).glob(f"*{SHARD_SUFFIX}"))
    else:
        paths = [Path(text)]
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"WebDataset shards {text}: {missing[0] if missing else 'no .tar file'} does not exist")
    return paths


def _sample_key(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, extension = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, extension.lower()


def read_webdataset_rows(source: str | Path) -> list[dict]:
    """Manifest-like rows of the shards, in shard then member order: the row of KEY.json plus
    "image" (the shard's path), "tar_member" (the image's member name); "id" defaults to the key."""
    rows = []
    for shard in expand_shards(source):
        samples: dict[str, dict] = {}
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _sample_key(member.name)
                sample = samples.setdefault(key, {})
                if extension == "json":
                    try:
                        sample["row"] = json.loads(tar.extractfile(member).read())
                    except json.JSONDecodeError as err:
                        raise ValueError(f"WebDataset shard {shard}: {member.name} is not JSON ({err})") from err
                elif extension in IMAGE_SUFFIXES:
                    sample["member"] = member.name
        for key, sample in samples.items():
            if "member" not in sample or "row" not in sample:
                raise ValueError(f"WebDataset shard {shard}: sample {key!r} needs an image ({'/'.join(IMAGE_SUFFIXES)}) "
                                 "and a .json row; it has " + (", ".join(sorted(sample)) or "nothing"))
            row = dict(sample["row"])
            row.setdefault("id", key.rsplit("/", 1)[-1])
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"WebDataset shard {shard}: {key}.json lacks the string field 'prompt'")
            row.update({"image": str(shard.resolve()), "tar_member": sample["member"]})
            rows.append(row)
    if not rows:
        raise ValueError(f"WebDataset shards {source}: no samples")
    return rows


class ShardReader:
    """Random access to tar members: one open file and one member index per shard, made on first use."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def read(self, shard: str, member: str) -> bytes:
        if shard not in self._open:
            tar = tarfile.open(shard, "r:")
            self._open[shard] = (tar, {m.name: m for m in tar.getmembers()})
        tar, members = self._open[shard]
        if member not in members:
            raise KeyError(f"WebDataset shard {shard} has no member {member!r}")
        return tar.extractfile(members[member]).read()

    @contextmanager
    def extracted(self, shard: str, member: str):
        """A temporary file holding the member's bytes, for the block: the image is then read by the same
        reader as the manifest's files (`dataset.load_gray_image`), so a shard decodes exactly as they do."""
        with tempfile.TemporaryDirectory(prefix="cyclex-shard-") as folder:
            path = Path(folder) / member.rsplit("/", 1)[-1]
            path.write_bytes(self.read(shard, member))
            yield path

    def __getstate__(self) -> dict:  # a DataLoader worker opens its own files
        return {"_open": {}}


def write_webdataset_shards(manifest_rows: Sequence[dict], folder: str | Path, *, samples_per_shard: int = 1000,
                            prefix: str = "train", dataset_json: str | Path | None = None) -> list[Path]:
    """Write `manifest_rows` (read_manifest's) as shards FOLDER/PREFIX-000000.tar ...; each shard atomically.

    A shard already there with the same samples is kept, so an interrupted write resumes.
    dataset_json: the data set's dataset.json (prompt template, prompt source), copied into FOLDER,
    where the tailored SD's metadata looks for it as it does beside a manifest.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    folder = Path(folder)
    if dataset_json is not None:
        atomic_write(folder / "dataset.json", lambda handle: handle.write(Path(dataset_json).read_bytes()))
    paths = []
    for number, start in enumerate(range(0, len(manifest_rows), samples_per_shard)):
        chunk = manifest_rows[start:start + samples_per_shard]
        path = folder / f"{prefix}-{number:06d}{SHARD_SUFFIX}"
        paths.append(path)
        if path.is_file() and [r["id"] for r in read_webdataset_rows(path)] == [str(r["id"]) for r in chunk]:
            continue

        def write(handle, chunk=chunk):
            with tarfile.open(fileobj=handle, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                for number_in_shard, row in enumerate(chunk):
                    key = f"{number_in_shard:06d}"  # keys are file-name safe whatever the ids hold
                    image = Path(row["image"])
                    meta = {k: v for k, v in row.items() if k not in ("image", "tar_member")}
                    for name, data in ((f"{key}{image.suffix.lower()}", image.read_bytes()),
                                       (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))

        atomic_write(path, write)
    return paths
