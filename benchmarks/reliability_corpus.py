"""The hostile-input corpus of issue 18: every case a bad input to one command, and what must happen.

A case builds its inputs in a fresh folder and names the command line. The harness (`run_case`) runs
it in this process through typer's CliRunner, with a time limit, and sorts the outcome into one of:

- ``clear_error``: a non-zero exit whose message names the file or field at fault (`Prepared.names`);
- ``skipped_logged``: the bad item is named in the output and listed, and every good item is done;
- ``ok``: a hostile but valid input handled correctly (`Prepared.check` says what correct is);
- ``unclear``: a traceback, an exception escaping the command, or an error that names nothing;
- ``hang``: the time limit passed; ``silent_wrong``: exit 0 with a wrong or missing result;
- ``data_loss``: a file that existed before (a finished result, a user's file) changed or vanished.

`CASES` is the full corpus (benchmarks/reliability.py runs it all into reliability.json);
tests/test_reliability.py runs one case of every family in `make test`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cyclex.file_names import printable_text

GOOD = "python:benchmarks.hostile_generators:heart_reports"
HOSTILE = "python:benchmarks.hostile_generators:"
SIDE = 64
OUTCOMES = ("clear_error", "skipped_logged", "ok", "unclear", "hang", "silent_wrong", "data_loss")
FAILURES = ("unclear", "hang", "silent_wrong", "data_loss")


@dataclass
class Prepared:
    """What one case runs and how its outcome is judged."""

    args: list[str]
    expect: str  # "error", "skipped" or "ok"
    names: tuple[str, ...] = ()  # what the message must name (a file, a field, an id)
    check: Callable[[Any], str | None] | None = None  # None when the result is right, else what is wrong
    keep: tuple[Path, ...] = ()  # files (or folders) that must be byte-identical afterwards
    patch: Callable[[], contextlib.AbstractContextManager] | None = None  # e.g. a full disk
    timeout_s: int = 180


@dataclass(frozen=True)
class Case:
    name: str
    command: str
    prepare: Callable[[Path, Fixtures], Prepared]


@dataclass
class Fixtures:
    """Built once per corpus run: a tiny tailored SD (also the base of train-tailored) and a finished run."""

    root: Path
    _done: dict[str, Path] = field(default_factory=dict)

    @property
    def tailored(self) -> Path:
        if "tailored" not in self._done:
            from cyclex.demo.tiny_sd import tiny_sd_pipeline

            folder = self.root / "tailored"
            tiny_sd_pipeline().save_pretrained(folder)
            (folder / "cyclex_tailored.json").write_text(json.dumps(
                {"vocabulary": [], "prompt_template": "cvlm", "sample_size": SIDE, "uncertain_as_present": True}))
            self._done["tailored"] = folder
        return self._done["tailored"]

    @property
    def finished_run(self) -> Path:
        """A finished explain run of two good images (copied by each case that uses it)."""
        if "run" not in self._done:
            from typer.testing import CliRunner

            from cyclex.cli import app

            images = good_folder(self.root / "run-images", n=2)
            out = self.root / "finished-run"
            result = CliRunner().invoke(app, explain_args(images, out, self.tailored))
            if result.exit_code != 0:
                raise RuntimeError(f"the reference run failed: {result.output[-2000:]}")
            self._done["run"] = out
        return self._done["run"]

    def run_copy(self, folder: Path) -> Path:
        shutil.copytree(self.finished_run, folder, symlinks=True)
        return folder


# -- building blocks -----------------------------------------------------------------------------------
def good_image(value: float = 0.9, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((SIDE, SIDE), 0.2, np.float32) + rng.normal(0, 0.02, (SIDE, SIDE)).astype(np.float32)
    image[SIDE // 3: 2 * SIDE // 3, SIDE // 3: 2 * SIDE // 3] = value
    return np.uint8(np.clip(image, 0, 1) * 255 + 0.5)


def good_folder(folder: Path, n: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(good_image(seed=i)).save(folder / f"good{i}.png")
    return folder


def explain_args(images: Path | str, out: Path, tailored: Path, *extra: str, generator: str = GOOD) -> list[str]:
    return ["explain", "--generator", generator, "--tailored", str(tailored), "--images", str(images),
            "--out", str(out), "--steps", "1", "--labeler", "rules", "--findings", "Cardiomegaly", *extra]


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares `width` x `height` with almost no pixel data (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _tiff(array: np.ndarray, path: Path) -> None:
    import tifffile

    tifffile.imwrite(path, array)


def _write_float_tiff(path: Path, fill: float, where: str = "all") -> None:
    image = good_image().astype(np.float32) / 255
    if where == "all":
        image[:] = fill
    elif where == "one":
        image[5, 5] = fill
    else:
        image[: SIDE // 2] = fill
    try:
        _tiff(image, path)
    except ImportError:
        Image.fromarray(image, mode="F").save(path, format="TIFF")


def _dicom_bytes(pixel: bool = True, garbage: bool = False) -> bytes:
    """A DICOM file: valid with pixels, valid without pixel data, or the preamble followed by garbage."""
    import io

    preamble = b"\x00" * 128 + b"DICM"
    if garbage:
        return preamble + os.urandom(300)
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "hostile"
    if pixel:
        ds.Rows = ds.Columns = SIDE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = (np.full((SIDE, SIDE), 100, np.uint16)).tobytes()[: SIDE * SIDE]  # half the bytes
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _bad_image(kind: str, folder: Path) -> str:
    """Write one bad image file of `kind` into `folder`; returns its file name."""
    good = _png_bytes(good_image())
    writers: dict[str, tuple[str, Callable[[Path], Any]]] = {
        "zero-byte": ("empty.png", lambda p: p.write_bytes(b"")),
        "text-as-png": ("text.png", lambda p: p.write_text("not an image at all\n")),
        "html-as-png": ("page.png", lambda p: p.write_text("<html><script>alert(1)</script></html>")),
        "random-bytes": ("noise.png", lambda p: p.write_bytes(os.urandom(2048))),
        "gzip-as-png": ("packed.png", lambda p: p.write_bytes(gzip.compress(good))),
        "signature-only": ("signature.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n")),
        "bad-crc": ("crc.png", lambda p: p.write_bytes(good[:30] + bytes([good[30] ^ 0xFF]) + good[31:])),
        "bomb-header": ("bomb.png", lambda p: p.write_bytes(_png_declaring(200_000, 200_000))),
        "zero-width-header": ("zerowidth.png", lambda p: p.write_bytes(_png_declaring(0, 64))),
        "nan-tiff": ("nan.tiff", lambda p: _write_float_tiff(p, float("nan"))),
        "one-nan-pixel-tiff": ("onenan.tiff", lambda p: _write_float_tiff(p, float("nan"), "one")),
        "inf-tiff": ("inf.tiff", lambda p: _write_float_tiff(p, float("inf"), "half")),
        "corrupt-dicom": ("corrupt.dcm", lambda p: p.write_bytes(_dicom_bytes(garbage=True))),
        "dicom-without-pixels": ("nopixels.dcm", lambda p: p.write_bytes(_dicom_bytes(pixel=False))),
        "dicom-short-pixels": ("short.dcm", lambda p: p.write_bytes(_dicom_bytes(pixel=True))),
        "truncated-jpeg": ("cut.jpg", lambda p: p.write_bytes(_jpeg_bytes()[:300])),
        "1x1": ("one.png", lambda p: Image.fromarray(np.full((1, 1), 128, np.uint8)).save(p)),
        "2x2": ("two.png", lambda p: Image.fromarray(np.full((2, 2), 128, np.uint8)).save(p)),
        "8x64": ("thin.png", lambda p: Image.fromarray(np.full((8, 64), 128, np.uint8)).save(p)),
        "15x15": ("fifteen.png", lambda p: Image.fromarray(np.full((15, 15), 128, np.uint8)).save(p)),
        "symlink-to-text": ("link.png", lambda p: (_sibling(p, "target.txt").write_text("text"),
                                                   p.symlink_to(_sibling(p, "target.txt")))),
        "dangling-symlink": ("dangling.png", lambda p: p.symlink_to(p.parent / "nowhere.png")),
        "symlink-loop": ("loop.png", lambda p: (p.symlink_to(p.parent / "loop2.png"),
                                                (p.parent / "loop2.png").symlink_to(p))),
    }
    for fraction in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        writers[f"truncated-png-{fraction}"] = (f"truncated{int(fraction * 100)}.png",
                                                lambda p, f=fraction: p.write_bytes(good[: int(len(good) * f)]))
    name, write = writers[kind]
    write(folder / name)
    return name


BAD_IMAGE_KINDS = ("zero-byte", "text-as-png", "html-as-png", "random-bytes", "gzip-as-png", "signature-only",
                   "bad-crc", "bomb-header", "zero-width-header", "nan-tiff", "one-nan-pixel-tiff", "inf-tiff",
                   "corrupt-dicom", "dicom-without-pixels", "dicom-short-pixels", "truncated-jpeg", "1x1", "2x2",
                   "8x64", "15x15", "symlink-to-text", "dangling-symlink", "symlink-loop",
                   *(f"truncated-png-{f}" for f in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)))


def _sibling(path: Path, name: str) -> Path:
    return path.parent.parent / name  # outside the image folder, so it is not an image of its own


def _jpeg_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(good_image()).save(buffer, format="JPEG")
    return buffer.getvalue()


def _stem(name: str) -> str:
    return Path(name).stem


def _results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _skipped_ids(out: Path) -> set[str]:
    path = out / "skipped.jsonl"
    return {json.loads(x)["id"] for x in path.read_text().splitlines()} if path.is_file() else set()


# -- image families ----------------------------------------------------------------------------------
def _explain_bad_image(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images")
        name = _bad_image(kind, images)
        out = work / "run"

        def check(result) -> str | None:
            if {r["image_id"] for r in _results(out)} != {"good0"}:
                return f"the good image was not explained: {sorted(r['image_id'] for r in _results(out))}"
            if _stem(name) not in _skipped_ids(out):
                return f"{name} is not listed in skipped.jsonl ({sorted(_skipped_ids(out))})"
            return None

        return Prepared(explain_args(images, out, fx.tailored), "skipped", names=(_stem(name),), check=check)

    return prepare


def _generate_bad_image(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images")
        name = _bad_image(kind, images)
        out = work / "reports.csv"

        def check(result) -> str | None:
            import csv

            rows = list(csv.DictReader(out.open(newline=""))) if out.is_file() else []
            if [Path(r["image"]).name for r in rows] != ["good0.png"]:
                return f"reports.csv holds {[r['image'] for r in rows]}, expected the good image only"
            return None

        files = [str(images / "good0.png"), str(images / name)]
        return Prepared(["generate", GOOD, *files, "--out", str(out)], "skipped", names=(name,), check=check)

    return prepare


def _train_bad_image(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images", n=3)
        name = _bad_image(kind, images)
        out = work / "tailored"

        def check(result) -> str | None:
            failures = out / "dataset" / "failures.jsonl"
            listed = failures.read_text() if failures.is_file() else ""
            if _stem(name) not in listed:
                return f"{name} is not listed in {failures}"
            rows = (out / "dataset" / "manifest.jsonl").read_text().splitlines()
            return None if len(rows) == 3 else f"the manifest holds {len(rows)} images, expected the 3 good ones"

        return Prepared(["train-tailored", "--generator", GOOD, "--images", str(images), "--base", str(fx.tailored),
                         "--out", str(out), "--max-steps", "1", "--resolution", str(SIDE), "--batch-size", "2",
                         "--checkpointing-steps", "1", "--no-select", "--max-failed-fraction", "0.5"],
                        "skipped", names=(_stem(name),), check=check)

    return prepare


def _odd_image(kind: str, folder: Path) -> str:
    """A valid image in an unusual form (it must be explained, not skipped); returns its file name."""
    image = good_image()
    if kind == "16-bit":
        Image.fromarray(image.astype(np.uint16) * 257).save(folder / "deep.png")
        return "deep.png"
    if kind == "rgba":
        Image.fromarray(np.dstack([image] * 3 + [np.full_like(image, 255)])).save(folder / "rgba.png")
        return "rgba.png"
    if kind == "palette":
        Image.fromarray(image).convert("P").save(folder / "palette.png")
        return "palette.png"
    if kind == "large":
        big = np.array(Image.fromarray(image).resize((2048, 2048)))
        Image.fromarray(big).save(folder / "large.png")
        return "large.png"
    if kind == "non-utf8-name":
        name = os.fsdecode(b"caf\xe9.png")
        Image.fromarray(image).save(folder / name)
        return name
    if kind == "space-and-quote-name":
        Image.fromarray(image).save(folder / "it's a \"scan\" (1).png")
        return "it's a \"scan\" (1).png"
    if kind == "uppercase-suffix":
        Image.fromarray(image).save(folder / "SHOUT.PNG")
        return "SHOUT.PNG"
    raise KeyError(kind)


ODD_IMAGE_KINDS = ("16-bit", "rgba", "palette", "large", "non-utf8-name", "space-and-quote-name", "uppercase-suffix")


def _explain_odd_image(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = work / "images"
        images.mkdir(parents=True)
        name = _odd_image(kind, images)
        out = work / "run"
        expected = printable_text(str(Path(name).with_suffix("")))

        def check(result) -> str | None:
            done = {r["image_id"] for r in _results(out)}
            return None if done == {expected} else f"explained {sorted(done)}, expected [{expected!r}]"

        return Prepared(explain_args(images, out, fx.tailored), "ok", check=check)

    return prepare


def _generate_odd_image(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = work / "images"
        images.mkdir(parents=True)
        name = _odd_image(kind, images)
        out = work / "reports.csv"

        def check(result) -> str | None:
            import csv

            with open(out, newline="", encoding="utf-8", errors="surrogateescape") as handle:
                rows = list(csv.DictReader(handle))
            if [r["image"] for r in rows] != [str(images / name)]:
                return f"reports.csv names {[r['image'] for r in rows]}"
            return None if rows[0]["report"].startswith("Cardiomegaly") else f"report {rows[0]['report']!r}"

        return Prepared(["generate", GOOD, str(images / name), "--out", str(out)], "ok", check=check)

    return prepare


# -- labeling input ----------------------------------------------------------------------------------
def _label(csv_bytes: bytes | None, expect: str, names: tuple[str, ...] = (), *, extra: tuple[str, ...] = (),
           check: Callable[[list[dict]], str | None] | None = None, path_kind: str = "file",
           suffix: str = ".csv") -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        work.mkdir(parents=True, exist_ok=True)
        source = work / f"reports{suffix}"
        if path_kind == "file":
            source.write_bytes(csv_bytes)
        elif path_kind == "directory":
            source.mkdir()
        out = work / "labels.csv"

        def judged(result) -> str | None:
            import csv

            if not out.is_file():
                return f"{out} was not written"
            with out.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            return check(rows) if check else None

        shown = tuple(n.replace("{source}", source.name) for n in names)
        return Prepared(["label", str(source), "--out", str(out), *extra], expect, names=shown,
                        check=judged if expect == "ok" else None)

    return prepare


def _positive(finding: str, row: int = 0) -> Callable[[list[dict]], str | None]:
    def check(rows):
        if len(rows) <= row:
            return f"{len(rows)} label rows"
        return None if rows[row].get(finding) == "1" else f"row {row} {finding} = {rows[row].get(finding)!r}, expected 1"

    return check


def _n_rows(n: int) -> Callable[[list[dict]], str | None]:
    return lambda rows: None if len(rows) == n else f"{len(rows)} label rows, expected {n}"


def _quoted_report(prefix: str) -> Callable[[list[dict]], str | None]:
    def check(rows):
        cell = rows[0].get("report", "") if rows else ""
        return None if cell.startswith("'" + prefix) else f"report cell written as {cell[:30]!r} (formula not defused)"

    return check


LABEL_CASES: dict[str, Callable[[Path, Fixtures], Prepared]] = {
    "megabyte-report": _label(b'report\n"' + b"Cardiomegaly. " + b"x" * 1_100_000 + b'"\n', "ok", check=_n_rows(1)),
    "latin1-without-encoding": _label("report\nCardiom\u00e9galie s\u00e9v\u00e8re. Cardiomegaly.\n".encode("latin-1"),
                                      "error", ("{source}", "--encoding")),
    "latin1-with-encoding": _label('report\n"Cardiomegaly, s\u00e9v\u00e8re."\n'.encode("latin-1"), "ok",
                                   extra=("--encoding", "latin-1"), check=_positive("Cardiomegaly")),
    "utf8-bom": _label("\ufeffreport\nCardiomegaly.\n".encode(), "ok", check=_positive("Cardiomegaly")),
    "utf16": _label("report\nCardiomegaly.\n".encode("utf-16"), "error", ("{source}",)),
    "nan-and-none-words": _label(b"report\nNaN\nNone\nCardiomegaly.\n", "ok", check=_n_rows(3)),
    "empty-cells": _label(b"report\n\n\"\"\nCardiomegaly.\n", "ok",
                          check=lambda rows: None if rows and rows[-1].get("Cardiomegaly") == "1" else "lost a row"),
    "bidi-override": _label("report\nNo \u202ecardiomegaly\u202c. Cardiomegaly.\n".encode(), "ok",
                            check=_positive("Cardiomegaly")),
    "zero-width-chars": _label("report\nCardio\u200bmegaly.\n".encode(), "ok", check=_positive("Cardiomegaly")),
    "nul-bytes": _label(b"report\nCardiomegaly.\x00\x00 Effusion.\n", "ok",
                        check=lambda rows: None if len(rows) == 1 else f"{len(rows)} rows from one"),
    "missing-column": _label(b"text_body\nCardiomegaly.\n", "error", ("report",)),
    "zero-byte-csv": _label(b"", "error", ("{source}",)),
    "header-only": _label(b"report\n", "ok", check=_n_rows(0)),
    "binary-garbage": _label(os.urandom(4096), "error", ("{source}",)),
    "unterminated-quote": _label(b'report\n"Cardiomegaly. never closed\n', "ok",
                                 check=lambda rows: None if len(rows) == 1 else f"{len(rows)} rows"),
    "ragged-rows": _label(b"id,report\n1,Cardiomegaly.,extra,fields\n2,Edema.\n", "error", ("{source}",)),
    "crlf-lines": _label(b"report\r\nCardiomegaly.\r\nEdema.\r\n", "ok", check=_n_rows(2)),
    "gzip-csv": _label(gzip.compress(b"report\nCardiomegaly.\n"), "error", ("{source}",), suffix=".csv.gz"),
    "gzip-named-csv": _label(gzip.compress(b"report\nCardiomegaly.\n"), "error", ("{source}",)),
    "duplicate-columns": _label(b"report,report\nCardiomegaly.,Edema.\n", "ok", check=_n_rows(1)),
    "hostile-column-name": _label(b"<script>alert(1)</script>\nCardiomegaly.\n", "error", ("report",)),
    "missing-file": _label(None, "error", ("{source}",), path_kind="absent"),
    "directory-given": _label(None, "error", ("{source}",), path_kind="directory"),
    "many-columns": _label((",".join(f"c{i}" for i in range(5000)) + ",report\n" + ",".join("x" * 5000)
                            + ",Cardiomegaly.\n").encode(), "ok", check=_positive("Cardiomegaly")),
}
for _prefix in ("=", "+", "-", "@", "\t", "\r"):
    LABEL_CASES[f"formula-{ord(_prefix)}"] = _label(
        f'report\n"{_prefix}HYPERLINK(""http://x"")"\n'.encode(), "ok", check=_quoted_report(_prefix))


def _label_out_problem(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        work.mkdir(parents=True, exist_ok=True)
        source = work / "reports.csv"
        source.write_text("report\nCardiomegaly.\n")
        if kind == "out-is-directory":
            out = work / "labels"
            out.mkdir()
            return Prepared(["label", str(source), "--out", str(out)], "error", names=(out.name,))
        if kind == "out-in-missing-folder":
            out = work / "absent" / "labels.csv"
            return Prepared(["label", str(source), "--out", str(out)], "ok",
                            check=lambda r: None if out.is_file() else "not written")
        out = work / "labels.csv"  # disk full while writing
        return Prepared(["label", str(source), "--out", str(out)], "error", names=("No space left",),
                        patch=disk_full, check=None)

    return prepare


# -- a full disk ------------------------------------------------------------------------------------
@contextlib.contextmanager
def disk_full(after: int = 0) -> Iterator[None]:
    """Every atomic write of cyclex after the first `after` fails as on a full disk (after creating its temp file)."""
    import errno

    import cyclex.atomic_io as atomic_io

    real = atomic_io.atomic_write
    calls = [0]

    def full(path, write, mode="wb"):
        calls[0] += 1
        if calls[0] <= after:
            return real(path, write, mode)

        def failing(handle):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        return real(path, failing, mode)

    atomic_io.atomic_write = full
    try:
        yield
    finally:
        atomic_io.atomic_write = real


# -- explain: inputs, generators, folders ------------------------------------------------------------------
def _explain_inputs(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        work.mkdir(parents=True, exist_ok=True)
        out = work / "run"
        if kind == "empty-folder":
            (work / "images").mkdir()
            return Prepared(explain_args(work / "images", out, fx.tailored), "error", names=("images",))
        if kind == "no-images-in-folder":
            (work / "images").mkdir()
            (work / "images" / "notes.txt").write_text("hello")
            return Prepared(explain_args(work / "images", out, fx.tailored), "error", names=("images",))
        if kind == "images-missing":
            return Prepared(explain_args(work / "absent", out, fx.tailored), "error", names=("absent",))
        if kind == "images-is-a-text-file":
            (work / "list.txt").write_text("a.png\n")
            return Prepared(explain_args(work / "list.txt", out, fx.tailored), "error", names=("list.txt",))
        good_folder(work / "images")
        csv = work / "images" / "index.csv"
        rows = {
            "csv-missing-image-column": "name,report\ngood0.png,x\n",
            "csv-missing-files": "image\ngood0.png\nabsent.png\n",
            "csv-path-traversal": "image\ngood0.png\n../../../../etc/passwd\n",
            "csv-duplicate-ids": "image,id\ngood0.png,a\ngood0.png,a\n",
            "csv-bad-chest-box": "image,x0,y0,x1,y1\ngood0.png,1,2,three,4\n",
            "csv-empty-image-cell": "image\ngood0.png\n\n\"\"\n",
            "csv-bad-label": "image,Cardiomegaly\ngood0.png,maybe\n",
            "csv-bad-split": "image,split\ngood0.png,holdout\n",
        }
        names = {"csv-missing-image-column": ("image",), "csv-missing-files": ("absent.png",),
                 "csv-path-traversal": ("passwd",), "csv-duplicate-ids": ("'a'",), "csv-bad-chest-box": ("three",),
                 "csv-empty-image-cell": ("row",), "csv-bad-label": ("maybe",), "csv-bad-split": ("holdout",)}
        if kind in rows:
            csv.write_text(rows[kind])
            if kind == "csv-empty-image-cell":  # pandas drops blank lines: a blank cell in a second column
                csv.write_text("image,report\ngood0.png,x\n,y\n")
            return Prepared(explain_args(csv, out, fx.tailored), "error", names=(csv.name, *names[kind]))
        raise KeyError(kind)

    return prepare


EXPLAIN_INPUT_KINDS = ("empty-folder", "no-images-in-folder", "images-missing", "images-is-a-text-file",
                       "csv-missing-image-column", "csv-missing-files", "csv-path-traversal", "csv-duplicate-ids",
                       "csv-bad-chest-box", "csv-empty-image-cell", "csv-bad-label", "csv-bad-split")


def _explain_generator(name: str, extra: tuple[str, ...] = ()) -> Callable[[Path, Fixtures], Prepared]:
    """A generator that misbehaves: its images fail (listed in skipped.jsonl), never a traceback."""

    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images", n=2)
        out = work / "run"

        def check(result) -> str | None:
            if _results(out):
                return f"{len(_results(out))} results were written from a broken generator"
            return None if _skipped_ids(out) == {"good0", "good1"} else f"skipped.jsonl: {sorted(_skipped_ids(out))}"

        return Prepared(explain_args(images, out, fx.tailored, *extra, generator=HOSTILE + name), "skipped",
                        names=("good0", "good1"), check=check)

    return prepare


def _explain_spec(spec: str, names: tuple[str, ...]) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images")
        return Prepared(explain_args(images, work / "run", fx.tailored, generator=spec), "error", names=names)

    return prepare


def _explain_option(options: tuple[str, ...], names: tuple[str, ...]) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images")
        args = explain_args(images, work / "run", fx.tailored)
        for option in options:  # "--flag=value" replaces an earlier --flag
            flag, _, value = option.partition("=")
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value] if value else [flag]
        return Prepared(args, "error", names=names)

    return prepare


def _tailored_problem(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images")
        tailored = work / "tailored"
        if kind == "missing":
            return Prepared(explain_args(images, work / "run", tailored), "error", names=("tailored",))
        shutil.copytree(fx.tailored, tailored)
        weights = tailored / "unet" / "diffusion_pytorch_model.safetensors"
        if kind == "truncated-safetensors":
            weights.write_bytes(weights.read_bytes()[:1000])
            names: tuple[str, ...] = ("unet",)
        elif kind == "pickle-instead-of-safetensors":
            weights.unlink()
            (tailored / "unet" / "diffusion_pytorch_model.bin").write_bytes(malicious_pickle(work / "PWNED"))
            names = ("unet",)
        elif kind == "empty-unet-folder":
            shutil.rmtree(tailored / "unet")
            (tailored / "unet").mkdir()
            names = ("unet",)
        elif kind == "config-not-json":
            (tailored / "unet" / "config.json").write_text("{ not json")
            names = ("config.json",)
        elif kind == "model-index-missing":
            (tailored / "model_index.json").unlink()
            names = ("model_index.json",)
        else:
            raise KeyError(kind)

        def check(result):
            return "a pickle in the weights ran" if (work / "PWNED").exists() else None

        return Prepared(explain_args(images, work / "run", tailored), "error", names=names, check=check)

    return prepare


def _out_problem(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images")
        out = work / "out"
        extra: tuple[str, ...] = ()
        if kind == "out-is-a-file":
            work.mkdir(parents=True, exist_ok=True)
            out.write_text("a user's file")
            return Prepared(explain_args(images, out, fx.tailored), "error", names=(out.name,), keep=(out,))
        if kind in ("foreign-folder", "foreign-folder-overwrite", "fake-run-config-overwrite"):
            out.mkdir(parents=True)
            (out / "thesis.docx").write_text("years of work")
            if kind == "fake-run-config-overwrite":
                (out / "run_config.json").write_text("not json, not cyclex's")
            extra = ("--overwrite",) if kind.endswith("overwrite") else ()
            return Prepared(explain_args(images, out, fx.tailored, *extra), "error", names=(out.name,),
                            keep=(out,))
        if kind == "symlink-to-foreign-folder":
            foreign = work / "foreign"
            foreign.mkdir(parents=True)
            (foreign / "data.csv").write_text("precious")
            out.symlink_to(foreign)
            return Prepared(explain_args(images, out, fx.tailored, "--overwrite"), "error", names=(out.name,),
                            keep=(foreign,))
        if kind in ("finished-run-other-settings", "finished-run-other-generator"):
            run = fx.run_copy(out)
            args = explain_args(fx.root / "run-images", run, fx.tailored)
            if kind == "finished-run-other-settings":
                args[args.index("--steps") + 1] = "2"
                names: tuple[str, ...] = ("steps",)
            else:
                args[args.index("--generator") + 1] = HOSTILE + "formula_reports"
                names = ("generator",)
            return Prepared(args, "error", names=names, keep=(run / "results.jsonl", run / "records"))
        if kind == "disk-full":  # the disk fills up after the first image's files: a clear error, no torn file
            more = good_folder(work / "more", n=3)

            def check(result) -> str | None:
                torn = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
                for record in (out / "records").rglob("*.json") if (out / "records").is_dir() else []:
                    try:
                        json.loads(record.read_text())
                    except ValueError:
                        torn.append(record)
                return f"torn or temporary files left: {torn}" if torn else None

            return Prepared(explain_args(more, out, fx.tailored, "--batch-size", "1"), "error",
                            names=("No space left",), patch=lambda: disk_full(after=14), check=check)
        raise KeyError(kind)

    return prepare


# -- evaluate / report -------------------------------------------------------------------------------
def _evaluate_problem(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        work.mkdir(parents=True, exist_ok=True)
        base = ["--classifier", "none", "--encoder", "none", "--lpips", "none", "--no-figures"]
        if kind == "run-missing":
            return Prepared(["evaluate", str(work / "absent"), *base], "error", names=("absent",))
        if kind == "not-a-run":
            (work / "folder").mkdir()
            (work / "folder" / "x.txt").write_text("x")
            return Prepared(["evaluate", str(work / "folder"), *base], "error", names=("folder",))
        run = fx.run_copy(work / "run")
        lines = (run / "results.jsonl").read_text().splitlines()
        if kind == "corrupt-results-line":
            (run / "results.jsonl").write_text(lines[0] + "\n{broken json\n")
            return Prepared(["evaluate", str(run), *base], "error", names=("results.jsonl:2",))
        if kind == "results-not-utf8":
            (run / "results.jsonl").write_bytes(b"\xff\xfe" + lines[0].encode() + b"\n")
            return Prepared(["evaluate", str(run), *base], "error", names=("results.jsonl",))
        if kind == "item-files-missing":
            first = json.loads(lines[0])
            (run / first["files"]["counterfactual"]).unlink()
            return Prepared(["evaluate", str(run), *base], "error", names=("counterfactual.png",))
        if kind == "annotations-missing":
            return Prepared(["evaluate", str(run), *base, "--annotations", str(work / "boxes.csv")], "error",
                            names=("boxes.csv",))
        if kind == "annotations-garbage":
            (work / "boxes.csv").write_bytes(os.urandom(500))
            return Prepared(["evaluate", str(run), *base, "--annotations", str(work / "boxes.csv")], "error",
                            names=("boxes.csv",))
        if kind == "thresholds-missing":
            return Prepared(["evaluate", str(run), *base, "--thresholds", str(work / "t.json")], "error",
                            names=("t.json",))
        if kind == "thresholds-not-json":
            (work / "t.json").write_text("{")
            return Prepared(["evaluate", str(run), *base, "--thresholds", str(work / "t.json")], "error",
                            names=("t.json",))
        if kind == "thresholds-wrong-shape":
            (work / "t.json").write_text(json.dumps({"thresholds": "high"}))
            return Prepared(["evaluate", str(run), *base, "--thresholds", str(work / "t.json")], "error",
                            names=("t.json",))
        if kind == "classifier-weights-missing":
            return Prepared(["evaluate", str(run), "--classifier", f"xrv:densenet121-res224-all::{work / 'w.pt'}", "--encoder",
                             "none", "--lpips", "none", "--no-figures"], "error", names=("w.pt",))
        if kind == "classifier-pickle":
            (work / "w.pt").write_bytes(malicious_pickle(work / "PWNED"))
            return Prepared(["evaluate", str(run), "--classifier", f"xrv:densenet121-res224-all::{work / 'w.pt'}",
                             "--encoder", "none", "--lpips", "none", "--no-figures"], "error", names=("w.pt",),
                            check=lambda r: "a pickle ran" if (work / "PWNED").exists() else None)
        if kind == "bad-map-kind":
            return Prepared(["evaluate", str(run), *base, "--map", "sideways"], "error", names=("sideways",))
        raise KeyError(kind)

    return prepare


def _report_problem(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        work.mkdir(parents=True, exist_ok=True)
        if kind == "run-missing":
            return Prepared(["report", str(work / "absent")], "error", names=("absent",))
        run = fx.run_copy(work / "run")
        if kind == "corrupt-results":
            (run / "results.jsonl").write_text("{nope\n")
            return Prepared(["report", str(run)], "error", names=("results.jsonl",))
        if kind == "summary-missing":  # the page recomputes the rates from results.jsonl, with a warning
            (run / "summary.json").unlink()
            return Prepared(["report", str(run)], "ok", check=lambda r: None if "summary.json" in r.output
                            and (run / "index.html").is_file() else "no page, or no warning about summary.json")
        if kind == "file-outside-run":
            lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
            lines[0]["files"]["query"] = "../../../../etc/passwd"
            (run / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

            def check(result):
                page = (run / "index.html").read_text() if (run / "index.html").is_file() else ""
                return "the page links a file outside the run" if "etc/passwd" in page else None

            # a page without that image (shown as missing) or a refusal are both right; a link out is not
            return Prepared(["report", str(run)], "ok", check=check)
        raise KeyError(kind)

    return prepare


# -- train-tailored ---------------------------------------------------------------------------------------
def _train_problem(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        images = good_folder(work / "images", n=2)
        base = fx.tailored
        out = work / "tailored"
        options = {"--generator": GOOD, "--images": str(images), "--base": str(base), "--out": str(out),
                   "--max-steps": "1", "--resolution": str(SIDE), "--batch-size": "2"}
        names: tuple[str, ...]
        keep: tuple[Path, ...] = ()
        if kind == "base-missing":
            options["--base"], names = str(work / "nobase"), ("nobase",)
        elif kind == "base-empty-unet":
            broken = work / "base"
            shutil.copytree(base, broken)
            shutil.rmtree(broken / "unet")
            (broken / "unet").mkdir()
            options["--base"], names = str(broken), ("unet",)
        elif kind == "base-pickle":
            broken = work / "base"
            shutil.copytree(base, broken)
            (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
            (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(malicious_pickle(work / "PWNED"))
            options["--base"], names = str(broken), ("unet",)
        elif kind == "images-empty":
            empty = work / "empty"
            empty.mkdir()
            options["--images"], names = str(empty), ("empty",)
        elif kind == "images-missing":
            options["--images"], names = str(work / "noimages"), ("noimages",)
        elif kind == "out-is-a-file":
            out.write_text("a user's file")
            names, keep = (out.name,), (out,)
        elif kind == "bad-prompt-source":
            options["--prompt-source"], names = "dreams", ("dreams",)
        elif kind == "bad-template":
            options["--template"], names = "haiku", ("haiku",)
        elif kind == "bad-labeler":
            options["--labeler"], names = "oracle", ("oracle",)
        elif kind == "all-images-fail-in-generator":
            options["--generator"], names = HOSTILE + "raises", ("failures.jsonl",)
        elif kind == "other-run-in-out":
            out.mkdir()
            (out / "training_run.json").write_text(json.dumps({"generator": "python:other:gen", "base": "x",
                                                                "config": {}}))
            names, keep = ("generator",), (out / "training_run.json",)
        elif kind == "foreign-folder-overwrite":
            out.mkdir()
            (out / "notes.txt").write_text("mine")
            options["--overwrite"] = options["--no-select"] = ""
            names, keep = (), (out / "notes.txt",)
        else:
            raise KeyError(kind)
        args = ["train-tailored"]
        for flag, value in options.items():
            args += [flag, value] if value else [flag]
        expect = "ok" if kind == "foreign-folder-overwrite" else "error"

        def check(result):
            if (work / "PWNED").exists():
                return "a pickle in the weights ran"
            if expect == "ok" and not (out / "unet").is_dir():
                return "the training did not run"
            return None

        return Prepared(args, expect, names=names, keep=keep, check=check)

    return prepare


def _demo_problem(kind: str) -> Callable[[Path, Fixtures], Prepared]:
    def prepare(work: Path, fx: Fixtures) -> Prepared:
        work.mkdir(parents=True, exist_ok=True)
        out = work / "demo"
        if kind == "out-is-a-file":
            out.write_text("mine")
        else:
            out.mkdir()
            (out / "comparison.html").write_text("my own page")
        return Prepared(["demo", "--out", str(out), "--n", "1"], "error", names=(out.name,), keep=(out,))

    return prepare


# -- security -------------------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def malicious_pickle(sentinel: Path) -> bytes:
    """A torch-style checkpoint whose unpickling would run a shell command."""
    return pickle.dumps({"state_dict": _Exploit(sentinel)})


def _html_hostile(work: Path, fx: Fixtures) -> Prepared:
    images = good_folder(work / "images")
    out = work / "run"

    def check(result) -> str | None:
        page = (out / "index.html").read_text(encoding="utf-8")
        if '<script>document.title="pwned"' in page or 'onerror="document' in page:
            return "hostile report text reached the page unescaped"
        return None if "&lt;script&gt;" in page else "the hostile report is not shown (escaped) on the page"

    return Prepared(explain_args(images, out, fx.tailored, generator=HOSTILE + "hostile_html"), "ok", check=check)


def _csv_hostile(work: Path, fx: Fixtures) -> Prepared:
    images = good_folder(work / "images")
    out = work / "reports.csv"

    def check(result) -> str | None:
        import csv

        rows = list(csv.DictReader(out.open(newline="")))
        return None if rows and rows[0]["report"].startswith("'=") else f"formula written verbatim: {rows[:1]}"

    return Prepared(["generate", HOSTILE + "formula_reports", str(images / "good0.png"), "--out", str(out)], "ok",
                    check=check)


def _traversal_ids(work: Path, fx: Fixtures) -> Prepared:
    images = good_folder(work / "images")
    (images / "index.csv").write_text("image,id\ngood0.png,../../../escaped\n")
    out = work / "run"

    def check(result) -> str | None:
        escaped = [p for p in work.rglob("*escaped*") if out not in p.parents]
        if escaped:
            return f"an id wrote outside the run folder: {escaped}"
        return None if _results(out) else "the image was not explained"

    return Prepared(explain_args(images / "index.csv", out, fx.tailored), "ok", check=check)


def _traversal_finding(work: Path, fx: Fixtures) -> Prepared:
    images = good_folder(work / "images")
    args = explain_args(images, work / "run", fx.tailored)
    args[args.index("--findings") + 1] = "../../etc/passwd"
    return Prepared(args, "error", names=("passwd",))


def _pickle_loaders(work: Path, fx: Fixtures) -> Prepared:
    """Every weight reader of cyclex is given a malicious pickle; none may run it."""
    work.mkdir(parents=True, exist_ok=True)
    sentinel = work / "PWNED"
    blob = work / "weights.pth"
    blob.write_bytes(malicious_pickle(sentinel))
    from cyclex.labelers.chexbert import load_chexbert_state

    tried = []
    for name, load in (("chexbert", lambda: load_chexbert_state(blob)),):
        tried.append(name)
        with contextlib.suppress(Exception):
            load()
    import torch

    with contextlib.suppress(Exception):
        torch.load(blob, weights_only=True)  # the rule every reader follows

    def check(result) -> str | None:
        return f"a pickle ran in {tried}" if sentinel.exists() else None

    return Prepared(["--help"], "ok", check=check)


SECURITY_CASES: dict[str, Callable[[Path, Fixtures], Prepared]] = {
    "html-hostile-report": _html_hostile,
    "csv-formula-report": _csv_hostile,
    "path-traversal-id": _traversal_ids,
    "path-traversal-finding": _traversal_finding,
    "pickle-chexbert-and-torch-load": _pickle_loaders,
    "pickle-tailored-unet": _tailored_problem("pickle-instead-of-safetensors"),
    "pickle-train-base": _train_problem("base-pickle"),
    "pickle-classifier": _evaluate_problem("classifier-pickle"),
    "overwrite-foreign-folder": _out_problem("foreign-folder-overwrite"),
    "overwrite-fake-run-config": _out_problem("fake-run-config-overwrite"),
    "overwrite-through-symlink": _out_problem("symlink-to-foreign-folder"),
    "out-is-a-file": _out_problem("out-is-a-file"),
    "report-file-outside-run": _report_problem("file-outside-run"),
    "demo-user-folder": _demo_problem("user-folder"),
    "train-foreign-folder-overwrite": _train_problem("foreign-folder-overwrite"),
}


def _all_cases() -> list[Case]:
    cases = []
    for kind in BAD_IMAGE_KINDS:
        cases.append(Case(f"explain/image/{kind}", "explain", _explain_bad_image(kind)))
        cases.append(Case(f"generate/image/{kind}", "generate", _generate_bad_image(kind)))
        cases.append(Case(f"train-tailored/image/{kind}", "train-tailored", _train_bad_image(kind)))
    for kind in ODD_IMAGE_KINDS:
        cases.append(Case(f"explain/odd-image/{kind}", "explain", _explain_odd_image(kind)))
        cases.append(Case(f"generate/odd-image/{kind}", "generate", _generate_odd_image(kind)))
    for kind, prepare in LABEL_CASES.items():
        cases.append(Case(f"label/{kind}", "label", prepare))
    for kind in ("out-is-directory", "out-in-missing-folder", "disk-full"):
        cases.append(Case(f"label/{kind}", "label", _label_out_problem(kind)))
    for kind in EXPLAIN_INPUT_KINDS:
        cases.append(Case(f"explain/input/{kind}", "explain", _explain_inputs(kind)))
    for name in ("raises", "returns_none", "wrong_count", "non_strings", "empty_strings", "whitespace_strings",
                 "exits"):
        cases.append(Case(f"explain/generator/{name}", "explain", _explain_generator(name)))
    cases.append(Case("explain/generator/hangs-with-timeout", "explain",
                      _explain_generator("hangs", ("--generator-timeout", "3"))))
    for spec, names in (("python:no_such_module_xyz:f", ("no_such_module_xyz",)),
                        (HOSTILE + "no_such_function", ("no_such_function",)),
                        (HOSTILE + "not_a_function", ("not_a_function",)),
                        ("hf:/nonexistent/model/dir", ("/nonexistent/model/dir",)),
                        ("r2gen:/nonexistent::ckpt.pth::ann.json", ("r2gen",)),
                        ("telepathy:x", ("telepathy",)), ("demo:nonexistent", ("nonexistent",))):
        cases.append(Case(f"explain/spec/{spec.split(':')[0]}-{names[0].strip('/').replace('/', '_')}", "explain",
                          _explain_spec(spec, names)))
    for options, names in ((("--findings=Heartache",), ("Heartache",)), (("--steps=0",), ("--steps",)),
                           (("--batch-size=0",), ("batch",)), (("--variant=telepathy",), ("telepathy",)),
                           (("--threshold=150",), ("threshold",)), (("--guidance=nan",), ("guidance",)),
                           (("--maker-option=notakeyvalue",), ("notakeyvalue",)),
                           (("--labeler=oracle",), ("oracle",)), (("--generator-timeout=-1",), ("timeout",)),
                           (("--resize=sideways",), ("sideways",)), (("--strength=2",), ("strength",))):
        cases.append(Case(f"explain/option/{options[0].lstrip('-').replace('=', '-')}", "explain",
                          _explain_option(options, names)))
    for kind in ("missing", "truncated-safetensors", "empty-unet-folder", "config-not-json", "model-index-missing"):
        cases.append(Case(f"explain/tailored/{kind}", "explain", _tailored_problem(kind)))
    for kind in ("out-is-a-file", "foreign-folder", "finished-run-other-settings", "finished-run-other-generator",
                 "disk-full"):
        cases.append(Case(f"explain/out/{kind}", "explain", _out_problem(kind)))
    for kind in ("run-missing", "not-a-run", "corrupt-results-line", "results-not-utf8", "item-files-missing",
                 "annotations-missing", "annotations-garbage", "thresholds-missing", "thresholds-not-json",
                 "thresholds-wrong-shape", "classifier-weights-missing", "bad-map-kind"):
        cases.append(Case(f"evaluate/{kind}", "evaluate", _evaluate_problem(kind)))
    for kind in ("run-missing", "corrupt-results", "summary-missing"):
        cases.append(Case(f"report/{kind}", "report", _report_problem(kind)))
    for kind in ("base-missing", "base-empty-unet", "images-empty", "images-missing", "out-is-a-file",
                 "bad-prompt-source", "bad-template", "bad-labeler", "all-images-fail-in-generator",
                 "other-run-in-out"):
        cases.append(Case(f"train-tailored/{kind}", "train-tailored", _train_problem(kind)))
    cases.append(Case("demo/out-is-a-file", "demo", _demo_problem("out-is-a-file")))
    return cases


CASES: list[Case] = _all_cases()
SECURITY: list[Case] = [Case(f"security/{name}", "security", prepare) for name, prepare in SECURITY_CASES.items()]


# -- the harness --------------------------------------------------------------------------------------
class _TimeLimit(BaseException):  # not an Exception: CliRunner and the commands must not catch it
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise _TimeLimit()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _fingerprint(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files and their relative names; None when absent."""
    if not path.exists() and not path.is_symlink():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode("utf-8", "surrogateescape"))
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _squash(text: str) -> str:
    return "".join(text.split())  # rich wraps long paths over lines


def run_case(case: Case, work: Path, fixtures: Fixtures) -> dict[str, Any]:
    """Run one case in a fresh folder `work`; returns {"case", "command", "outcome", "detail"}."""
    import csv
    import logging

    from typer.testing import CliRunner

    from cyclex.cli import app

    csv.field_size_limit(sys.maxsize)  # the checks read back megabyte reports
    prepared = case.prepare(work, fixtures)
    # each command calls logging.basicConfig on its own (CliRunner) stream: once the inputs are built (which
    # may run a command too), start without handlers, or this case logs into an earlier one's closed stream
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    # libraries (diffusers, transformers) keep a handler on the stderr of the case that first used them
    for logger in [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.__stderr__  # not setStream: it flushes the closed stream first
    before = {str(p): _fingerprint(p) for p in prepared.keep}
    detail = ""
    try:
        with _time_limit(prepared.timeout_s), (prepared.patch() if prepared.patch else contextlib.nullcontext()):
            result = CliRunner().invoke(app, prepared.args)
    except _TimeLimit:
        return {"case": case.name, "command": case.command, "outcome": "hang",
                "detail": f"no answer after {prepared.timeout_s} s"}
    output = result.output or ""
    lost = [p for p, digest in before.items() if _fingerprint(Path(p)) != digest]
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    problem = prepared.check(result) if prepared.check else None
    named = all(_squash(n) in _squash(output) for n in prepared.names)
    if lost:
        outcome, detail = "data_loss", f"changed or removed: {lost}"
    elif escaped or "Traceback" in output:
        outcome = "unclear"
        detail = f"{type(result.exception).__name__}: {result.exception}" if escaped else output[-800:]
    elif prepared.expect == "error":
        if result.exit_code == 0:
            outcome, detail = "silent_wrong", f"exit 0 on a bad input: {output[-400:]}"
        elif not named:
            outcome, detail = "unclear", f"the message does not name {prepared.names}: {output[-600:]}"
        elif problem:
            outcome, detail = "silent_wrong", problem
        else:
            outcome = "clear_error"
    elif prepared.expect == "skipped":
        if problem:
            outcome, detail = "silent_wrong", problem
        elif not named:
            outcome, detail = "unclear", f"the output does not name {prepared.names}: {output[-600:]}"
        else:
            outcome = "skipped_logged"
    else:  # "ok": a valid input that looks hostile
        if result.exit_code != 0:
            outcome, detail = "unclear", f"exit {result.exit_code} on a valid input: {output[-600:]}"
        elif problem:
            outcome, detail = "silent_wrong", problem
        else:
            outcome = "ok"
    return {"case": case.name, "command": case.command, "outcome": outcome, "detail": detail[:1500]}
