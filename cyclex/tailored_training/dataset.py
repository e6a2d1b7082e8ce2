"""The tailored data set: the target generator's own reports on its training images (seed 003).

`build_tailored_dataset` runs the wrapped generator over the images in batches, labels the generated
reports and pairs every image with the structured prompt of its *generated* report. Ground-truth
reports, when the records carry them, are labelled and kept beside for comparison; they become the
training prompt only with `prompt_source="ground-truth"` (the paper's ablation).

Files written under `out`:
- `generated_reports.jsonl`: append-only cache, one line per finished image, flushed after every batch
  (a crash loses at most the batch in flight; a re-run reuses every cached line);
- `failures.jsonl`: images the generator (or the image reader) failed on, with the error;
- `manifest.jsonl`: id, image, report, labels, prompt, generated_prompt, [ground_truth_report,
  ground_truth_labels, ground_truth_prompt];
- `counts.json`: per-finding counts of the training prompts and of every label state;
- `dataset.json`: how the manifest was made (generator, labeler, template, prompt source).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cyclex.adapters.base import ReportGenerator, check_reports
from cyclex.atomic_io import write_jsonl_atomic
from cyclex.datasets.images import IMAGE_SUFFIXES, MIN_IMAGE_SIDE, ImageReadError, read_image
from cyclex.findings import ABNORMALITIES, FINDINGS, FindingLabels, LabelState, StructuredPrompt
from cyclex.image_checks import check_image_batch
from cyclex.jsonl import read_jsonl
from cyclex.tailored_training.config import PROMPT_SOURCES, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_NAME = "generated_reports.jsonl"
FAILURES_NAME = "failures.jsonl"
MANIFEST_NAME = "manifest.jsonl"


class EmptyDatasetError(ValueError):
    """No image to build a data set from, or no image for which the generator produced a report."""


class TooManyFailuresError(ValueError):
    """More images failed (generator or reader) than `max_failed_fraction` allows; failures.jsonl lists them."""


# Share of images that may fail before the data set is refused: a few unreadable files in a large
# set are normal; a tenth of the set failing is a broken generator setup (e.g. a decoder running
# past its positions), and training on the rest would silently bias the tailored SD.
DEFAULT_MAX_FAILED_FRACTION = 0.01


def summarize_failures(failures: Sequence[dict], total: int, limit: int = 3) -> str:
    """'12 of 100 images (12.0 %) failed: 11 x IndexError: ..., 1 x ...' (the commonest errors first)."""
    from collections import Counter

    kinds = Counter(str(row.get("error", "?")).splitlines()[0][:160] for row in failures)
    listed = "; ".join(f"{n} x {text}" for text, n in kinds.most_common(limit))
    more = f"; and {len(kinds) - limit} other errors" if len(kinds) > limit else ""
    share = 100.0 * len(failures) / total if total else 0.0
    return f"{len(failures)} of {total} images ({share:.1f} %) failed: {listed}{more}"


@dataclass(frozen=True)
class ImageRecord:
    """One training image: a unique id, its file, and its ground-truth report when known."""

    id: str
    image: Path
    ground_truth_report: str | None = None


# ----------------------------------------------------------------------------------------------------
# Reading inputs
# ----------------------------------------------------------------------------------------------------


def load_gray_image(path: str | Path, size: int | tuple[int, int] | None = None, *,
                    min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Read an image file as float32 (H, W) in [0, 1] with the one reader of cyclex (`read_image`).

    PNG, JPEG, TIFF, BMP and DICOM, 8- or 16-bit; colour becomes luminance. Corrupt, truncated,
    non-finite, oversized and under-`min_side` images raise ValueError naming the file (a tiny image
    would be scaled up to a flat grey and trained on). size: an int (square) or (H, W) to resize to
    with bilinear filtering; None keeps the file's size.
    """
    from PIL import Image

    try:
        array = read_image(path)
    except ImageReadError as err:
        raise ValueError(str(err)) from err
    if min(array.shape) < min_side:
        raise ValueError(f"{path}: the image is {array.shape[1]} x {array.shape[0]} pixels; cyclex uses images of "
                         f"at least {min_side} x {min_side}")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        array = np.asarray(Image.fromarray(array, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
    return np.clip(array, 0.0, 1.0)


def _record_from(item: object, position: int) -> ImageRecord:
    if isinstance(item, ImageRecord):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        return ImageRecord(id=path.stem, image=path)
    if isinstance(item, dict):
        get = item.get
    else:
        def get(key, default=None):
            return getattr(item, key, default)
    image = get("image", None) or get("image_path", None) or get("path", None)
    if image is None:
        raise ValueError(f"image record {position} has no 'image' path (keys: id, image, report)")
    if isinstance(image, (np.ndarray, torch.Tensor)):
        raise ValueError(
            f"image record {position} holds pixels, not a path; write the images to files first "
            "(e.g. cyclex.datasets.phantom.write_phantom_folder) and pass the file paths"
        )
    path = Path(image)
    record_id = get("id", None)
    report = get("ground_truth_report", None) or get("report", None)
    if report is not None and not isinstance(report, str):
        raise ValueError(f"image record {position}: report must be a string, got {type(report).__name__}")
    return ImageRecord(id=str(record_id) if record_id is not None else path.stem, image=path,
                       ground_truth_report=report or None)


def as_image_records(images: Iterable[object]) -> list[ImageRecord]:
    """Normalise paths / dicts / objects with id, image, report into `ImageRecord`s with unique ids."""
    records = [_record_from(item, i) for i, item in enumerate(images)]
    seen: dict[str, Path] = {}
    for record in records:
        if record.id in seen:
            raise ValueError(f"duplicate image id {record.id!r} ({seen[record.id]} and {record.image}); ids must be unique")
        seen[record.id] = record.image
    return records


def read_image_source(source: str | Path) -> list[ImageRecord]:
    """Records from a folder (a phantom folder's metadata.jsonl, else its image files) or a CSV.

    CSV columns: `image` (or `path`), optional `id`, optional `report`; relative paths are resolved
    against the CSV's folder.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"image source {source} does not exist (expected a folder or a CSV file)")
    if source.is_dir():
        metadata = source / "metadata.jsonl"
        if metadata.is_file():
            rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
            for row in rows:
                row["image"] = str((source / row["image"]).resolve()) if not Path(row["image"]).is_absolute() else row["image"]
            return as_image_records(rows)
        # broken symlinks named like images stay in: reading them fails, so they are listed in failures.jsonl
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and (p.is_file() or p.is_symlink()))
        if not files:
            raise FileNotFoundError(f"image source {source}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no "
                                    "metadata.jsonl")
        return as_image_records(files)
    if source.suffix.lower() == ".csv":
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and not ({"image", "path"} & set(rows[0])):
            raise ValueError(f"CSV {source} needs an 'image' (or 'path') column; found columns {list(rows[0])}")
        for row in rows:
            key = "image" if "image" in row else "path"
            path = Path(row[key])
            row["image"] = str(path if path.is_absolute() else (source.parent / path).resolve())
            if "path" in row and key == "path":
                row.pop("path")
        return as_image_records(rows)
    raise ValueError(f"image source {source} must be a folder or a .csv file")


# ----------------------------------------------------------------------------------------------------
# Append-only cache
# ----------------------------------------------------------------------------------------------------


def _append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    if not rows:
        return
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())



# ----------------------------------------------------------------------------------------------------
# Running the generator
# ----------------------------------------------------------------------------------------------------


def _generator_size(generator: ReportGenerator) -> tuple[int, int] | None:
    info = getattr(generator, "info", None)
    size = getattr(info, "input_size", None)
    return tuple(size) if size else None


def _generate_batch(generator: ReportGenerator, name: str, records: list[ImageRecord],
                    size: tuple[int, int] | None) -> tuple[list[dict], list[dict]]:
    """Reports for a batch; on a batch failure, retry image by image and report the failing ones."""
    done: list[dict] = []
    failed: list[dict] = []
    arrays: list[np.ndarray] = []
    readable: list[ImageRecord] = []
    for record in records:
        try:
            arrays.append(load_gray_image(record.image, size))
            readable.append(record)
        except (ValueError, FileNotFoundError) as err:
            logger.warning("skipping image %s: %s", record.image, err)
            failed.append({"id": record.id, "image": str(record.image), "error": str(err)})
    if not readable:
        return done, failed
    if size is None and len({a.shape for a in arrays}) > 1:
        # Images of mixed sizes: batch them at the first image's size (the adapter resizes anyway).
        arrays = [load_gray_image(r.image, arrays[0].shape) for r in readable]

    def run(batch_records: list[ImageRecord], batch_arrays: list[np.ndarray]) -> list[str]:
        images = check_image_batch(torch.from_numpy(np.stack(batch_arrays))[:, None])
        return check_reports(generator.generate(images), len(batch_records), generator=name)

    try:
        reports = run(readable, arrays)
        done = [{"id": r.id, "image": str(r.image), "report": t} for r, t in zip(readable, reports, strict=True)]
    except Exception as batch_error:  # noqa: BLE001 - any generator failure falls back to one image at a time
        logger.warning("generator %s failed on a batch of %d (%s); retrying image by image",
                       name, len(readable), batch_error)
        for record, array in zip(readable, arrays, strict=True):
            try:
                report = run([record], [array])[0]
                done.append({"id": record.id, "image": str(record.image), "report": report})
            except Exception as err:  # noqa: BLE001 - logged, recorded and skipped; the run goes on
                logger.warning("generator %s failed on image %s: %s", name, record.image, err)
                failed.append({"id": record.id, "image": str(record.image), "error": f"{type(err).__name__}: {err}"})
    return done, failed


def build_tailored_dataset(
    generator: ReportGenerator,
    images: Iterable[object],
    labeler,
    out: str | Path,
    batch_size: int = 16,
    prompt_source: str = "generated",
    template: str = "cvlm",
    uncertain_as_present: bool = True,
    show_progress: bool = True,
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION,
) -> Path:
    """Run `generator` over `images`, label its reports and write the tailored manifest.

    generator: a `ReportGenerator` (`generate((B, 1, H, W) float [0, 1]) -> B strings`); images are
    fed at `generator.info.input_size` when set, else at their file size.
    images: paths, or records (dicts / objects) with `id`, `image` (a path) and optional `report`
    (ground truth). labeler: a `Labeler` (`label(reports) -> list[FindingLabels]`).
    prompt_source: "generated" (CVLM) or "ground-truth" (the ablation; every record needs a report).
    max_failed_fraction: refuse (TooManyFailuresError, after writing failures.jsonl) when more than
    this share of the images failed; below it, the skipped images are counted in dataset.json and
    counts.json and summarised in one warning (the commonest errors with their counts).
    Returns the path of `manifest.jsonl` in `out`.
    """
    if not 0.0 <= float(max_failed_fraction) <= 1.0:
        raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
    if prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"prompt_source must be one of {PROMPT_SOURCES}, got {prompt_source!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    StructuredPrompt((), template=template)  # fails early on an unknown template
    records = as_image_records(images)
    if not records:
        raise EmptyDatasetError("build_tailored_dataset got no images: pass image paths or records with an 'image' path")
    if prompt_source == "ground-truth":
        missing = [r.id for r in records if r.ground_truth_report is None]
        if missing:
            raise ValueError(
                f"prompt_source='ground-truth' needs a ground-truth report for every image; {len(missing)} have none "
                f"(first: {missing[:5]})"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = getattr(getattr(generator, "info", None), "name", type(generator).__name__)
    size = _generator_size(generator)

    # 1. Reuse finished items from the append-only cache.
    cache_path = out / CACHE_NAME
    # skip_unreadable: a crash mid-append leaves a torn line; its image is simply generated again
    cache_rows = read_jsonl(cache_path, skip_unreadable=True) if cache_path.is_file() else []
    cached = {row["id"]: row for row in cache_rows if "id" in row and isinstance(row.get("report"), str)}
    todo = [r for r in records if r.id not in cached]
    if cached:
        logger.info("reusing %d cached reports from %s; %d images to go", len(records) - len(todo), cache_path, len(todo))

    # 2. Generate in batches, flushing each finished batch to the cache.
    failures: dict[str, dict] = {}
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc=f"reports from {name}", unit="img", disable=not show_progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            done, failed = _generate_batch(generator, name, batch, size)
            _append_jsonl(cache_path, done)
            _append_jsonl(out / FAILURES_NAME, failed)
            for row in done:
                cached[row["id"]] = row
            for row in failed:
                failures[row["id"]] = row
            bar.update(len(batch))
    # failures.jsonl keeps only the images still failing after this run.
    write_jsonl_atomic(out / FAILURES_NAME, failures.values())
    kept = [r for r in records if r.id in cached]
    if not kept:
        raise EmptyDatasetError(
            f"generator {name} produced no report for any of the {len(records)} images; see {out / FAILURES_NAME}"
        )
    if failures:
        summary = summarize_failures(list(failures.values()), len(records))
        if len(failures) > max_failed_fraction * len(records):
            raise TooManyFailuresError(
                f"generator {name}: {summary}. That is more than the {100 * max_failed_fraction:g} % allowed "
                f"(--max-failed-fraction); every failure is listed in {out / FAILURES_NAME}. Fix the cause and "
                "run again (finished reports are cached), or raise --max-failed-fraction to train without them")
        logger.warning("tailored data set without %s (skipped; listed in %s)", summary, out / FAILURES_NAME)

    # 3. Label generated (and ground-truth) reports.
    generated_reports = [cached[r.id]["report"] for r in kept]
    generated_labels = _label_all(labeler, generated_reports, "generated reports")
    gt_positions = [i for i, r in enumerate(kept) if r.ground_truth_report is not None]
    gt_labels = dict(zip(gt_positions, _label_all(labeler, [kept[i].ground_truth_report for i in gt_positions],
                                                   "ground-truth reports"), strict=True))

    # 4. Manifest rows: the training prompt follows prompt_source.
    rows = []
    for i, record in enumerate(kept):
        generated_prompt = StructuredPrompt.from_labels(
            generated_labels[i], uncertain_as_present=uncertain_as_present, template=template).text
        row = {"id": record.id, "image": str(record.image), "report": generated_reports[i],
               "labels": generated_labels[i].to_dict(), "prompt": generated_prompt,
               "generated_prompt": generated_prompt}
        if i in gt_labels:
            gt_prompt = StructuredPrompt.from_labels(
                gt_labels[i], uncertain_as_present=uncertain_as_present, template=template).text
            row.update(ground_truth_report=record.ground_truth_report, ground_truth_labels=gt_labels[i].to_dict(),
                       ground_truth_prompt=gt_prompt)
            if prompt_source == "ground-truth":
                row["prompt"] = gt_prompt
        rows.append(row)
    manifest = write_jsonl_atomic(out / MANIFEST_NAME, rows)

    # 5. Counts per finding and a description of how the manifest was made.
    training_labels = [gt_labels[i] if prompt_source == "ground-truth" else generated_labels[i] for i in range(len(kept))]
    write_json_atomic(out / "counts.json", finding_counts(training_labels, uncertain_as_present,
                                                          n_failed=len(failures), prompt_source=prompt_source))
    write_json_atomic(out / "dataset.json", {
        "generator": name, "labeler": type(labeler).__name__, "template": template,
        "uncertain_as_present": uncertain_as_present, "prompt_source": prompt_source,
        "n_images": len(rows), "n_failed": len(failures),
    })
    logger.info("tailored data set: %d images, %d skipped -> %s", len(rows), len(failures), manifest)
    return manifest


def _label_all(labeler, reports: list[str], what: str) -> list[FindingLabels]:
    if not reports:
        return []
    labels = list(labeler.label(reports))
    if len(labels) != len(reports) or not all(isinstance(x, FindingLabels) for x in labels):
        raise TypeError(f"labeler {type(labeler).__name__} must return one FindingLabels per report for the {what}")
    return labels


def finding_counts(labels: Sequence[FindingLabels], uncertain_as_present: bool, **extra) -> dict:
    """{"n_images", "present": {finding: n}, "states": {finding: {state: n}}, ...extra}."""
    present = {f: 0 for f in ABNORMALITIES}
    states = {f: {s.value: 0 for s in LabelState} for f in FINDINGS}
    normal = 0
    for item in labels:
        found = item.present(uncertain_as_present=uncertain_as_present)
        normal += not found
        for f in found:
            present[f] += 1
        for f, s in item.states.items():
            states[f][s.value] += 1
    return {"n_images": len(labels), "n_without_abnormality": normal, "present": present, "states": states, **extra}


# ----------------------------------------------------------------------------------------------------
# Reading the manifest for training
# ----------------------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> list[dict]:
    """The manifest rows; a missing file, a missing field or an empty manifest is a clear error.

    `path` may also name WebDataset tar shards (a .tar, a folder of them, `train-{000000..000009}.tar`).
    """
    from cyclex.tailored_training.webdataset_shards import is_webdataset_source, read_webdataset_rows

    if is_webdataset_source(path):  # rows with "image" (the shard) and "tar_member" (webdataset_shards.py)
        return read_webdataset_rows(path)
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist; build it with build_tailored_dataset")
    rows = read_jsonl(path, skip_unreadable=True)
    if not rows:
        raise EmptyDatasetError(f"manifest {path} has no rows")
    for number, row in enumerate(rows, start=1):
        for key in ("id", "image", "prompt"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"manifest {path} row {number} lacks the string field {key!r}")
        image = Path(row["image"])
        if not image.is_absolute():
            row["image"] = str((path.parent / image).resolve())
    return rows


class TailoredImageDataset(torch.utils.data.Dataset):
    """(image, prompt) pairs of a manifest: image (1, R, R) float32 in [0, 1], R = resolution."""

    def __init__(self, rows: Sequence[dict], resolution: int):
        from cyclex.tailored_training.webdataset_shards import ShardReader

        self.rows = list(rows)
        self.resolution = resolution
        self.shards = ShardReader()  # rows read from WebDataset shards name a tar member

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        if "tar_member" in row:
            with self.shards.extracted(row["image"], row["tar_member"]) as path:
                try:
                    image = load_gray_image(path, self.resolution)
                except ValueError as err:
                    raise ValueError(f"WebDataset shard {row['image']}, member {row['tar_member']}: {err}") from err
        else:
            image = load_gray_image(row["image"], self.resolution)
        return {"pixel_values": torch.from_numpy(image)[None], "prompt": row["prompt"], "index": index}
