"""The run folder of `cyclex explain`: resumable, atomic, one line per (image, finding).

Layout::

    RUN/
      .cyclex-run.json       the marker that makes it a cyclex run folder (format, version, run id)
      .cyclex-run.lock       the run lock: one writer at a time (pid and host of the run writing now)
      run_config.json        settings of the run; resuming with other settings is refused
      explain_settings.json  the typed `ExplainSettings` the run was built from (`run_explain`)
      results.jsonl          one line per image x removed finding, input order then vocabulary order
      summary.json           Cyclic Rate overall and per finding, counts, seconds
      items/IMAGE/FINDING/   query.png, counterfactual.png, difference.png (positive part, colour,
                             drawn on the query), reconstruction.png (the maps' reference R, only
                             with difference_reference="reconstruction"),
                             frame.png (contours on the query), frame_mask.png (the frame's
                             K components, 0/255), signed.npy / positive.npy (float32
                             maps), mask.png (ground-truth mask, when the input had one),
                             difference_original.png / frame_original.png (the map and frame
                             on the query as given, when it was resized to the SD's side),
                             shortcut_mask.png (phantoms with the spurious marker),
                             NAME.npy per extra map of the maker (RSE: guidance_map, edit_mask)
                             and NAME.png for those over the image
      records/IMAGE/FINDING.json   the finished item's result line
      records/IMAGE/_complete.json the image is done (its finished findings listed)

Resume: an item is finished once its record file exists (written last, atomically); a re-run skips
finished items and finished images, and rebuilds results.jsonl from the record files, so an
interrupted-then-resumed run ends with the same results.jsonl as an uninterrupted one (timings
aside: they measure the run that made each item). Every file is written to a temporary name and
moved into place with `os.replace`; temporary files a killed run left are removed by the next one.

Ownership (`run_ownership`): cyclex writes only into a new or empty folder or a folder with its
marker (or a run folder of an earlier cyclex, which gets the marker), and `overwrite` deletes only
the files of a run folder. The run lock is held for the whole `run_explainer` call: a second run
into the same folder (resume or overwrite) is refused while the first one lives.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cyclex.atomic_io import (
    remove_stale_temp_files,
    write_bytes_atomic,
    write_json_atomic,
    write_npy_atomic,
    write_png_atomic,
    write_text_atomic,
)
from cyclex.cycle.explainer import CycleResult, CyclicExplainer, cyclic_rate
from cyclex.cycle.generator_faults import (
    GENERATOR_STAGE,
    IMAGE_STAGE,
    SKIPPED_NAME,
    SkippedItems,
    explain_isolating_faults,
    guarded_generator,
)
from cyclex.cycle.original_overlays import write_original_overlays
from cyclex.cycle.run_ownership import (  # noqa: F401  (RunFolderBusy: re-exported with RunFolderError)
    CONFIG_NAME,
    RunFolderBusy,
    RunFolderError,
    RunFolderState,
    inspect_run_folder,
    locked_run_folder,
    remove_run_files,
    write_marker,
)
from cyclex.cycle.settings import ExplainSettings
from cyclex.datasets.images import ImageReadError, read_image
from cyclex.explain.overlays import draw_frame, normalize_map, show_map_on_image
from cyclex.findings import ABNORMALITIES, canonical_finding, finding_slug
from cyclex.jsonl import to_json_safe
from cyclex.provenance import run_provenance

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
SUMMARY_NAME = "summary.json"
EXPLAIN_SETTINGS_NAME = "explain_settings.json"  # the typed ExplainSettings the run was built from
# Settings that do not change results: excluded from the resume check.
_NON_RESULT_SETTINGS = ("batch_size", "images")
# Settings added after runs were written: a run_config.json without them ran with these values.
_LATER_SETTING_DEFAULTS = {"difference_reference": "query", "map_blur": 1}


class RunSettingsChanged(RunFolderError):
    """The output folder is a run folder, made with different settings (`changed` names them)."""

    def __init__(self, message: str, changed: list[str]) -> None:
        super().__init__(message)
        self.changed = changed


def safe_name(text: str) -> str:
    """File-safe name for an image id; a short hash keeps distinct ids distinct after cleaning."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "image"
    if cleaned != str(text):
        cleaned = f"{cleaned[:80]}-{hashlib.sha1(str(text).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return cleaned


# -- inputs ----------------------------------------------------------------------------------------
def load_image_records(source: str | Path) -> list[dict[str, Any]]:
    """Records {"id", "image" (path), ...} from a phantom folder, an image folder or a CSV.

    Uses the datasets loaders: a phantom folder (metadata.jsonl present) through
    `read_phantom_folder` (ground-truth masks, chest boxes and shortcut flags come along); a folder
    of images or a CSV (image path column relative to the CSV's folder, optional id column and
    x0, y0, x1, y1 chest box columns) through `read_image_folder`. The first view of each record is used.
    """
    from cyclex.datasets.folder import read_image_folder

    src = Path(source)
    if src.is_dir() and (src / "metadata.jsonl").is_file():
        from cyclex.datasets.phantom import read_phantom_folder

        return [dict(r) for r in read_phantom_folder(src)]
    if src.is_dir():
        items = read_image_folder(src)
    elif src.is_file() and src.suffix.lower() == ".csv":
        items = read_image_folder(src.parent, src)
    else:
        raise FileNotFoundError(f"--images {src}: expected a folder of images, a phantom folder or a .csv file")
    records = []
    for item in items:
        record: dict[str, Any] = {"id": item.id, "image": str(item.image_paths[0])}
        box = [item.meta.get(k) for k in ("x0", "y0", "x1", "y1")]
        if all(v not in (None, "") for v in box):
            try:
                record["chest_box"] = [int(float(v)) for v in box]
            except ValueError as err:
                raise ValueError(f"{src}: record {item.id!r} has a non-numeric chest box {box}") from err
        records.append(record)
    return records


# -- the run -----------------------------------------------------------------------------------------
def _check_config(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Make `out` this run's folder (run lock held): start over, resume, or refuse; writes marker and config."""
    state = inspect_run_folder(out)
    if overwrite and state.kind != "new":
        # only the files of a run folder go (results, items, reports, evaluations); anything else stays
        remove_run_files(out, state)
        state = RunFolderState("new")
    remove_stale_temp_files(out)  # what writes killed in an earlier run left behind
    path = out / CONFIG_NAME
    if state.kind != "new" and path.is_file():
        previous = {**_LATER_SETTING_DEFAULTS, **json.loads(path.read_text())}
        strip = lambda c: {k: v for k, v in c.items() if k not in _NON_RESULT_SETTINGS}  # noqa: E731
        if strip(previous) != strip(config):
            changed = sorted(k for k in set(previous) | set(config)
                             if k not in _NON_RESULT_SETTINGS and previous.get(k) != config.get(k))
        if strip(previous) != strip(config) and not _finished_any_item(out):
            # the earlier run failed before finishing any item: nothing to keep, so it never locks the folder
            logger.warning("%s: the run made with other settings (%s) finished no item; starting over with these",
                           out, ", ".join(changed))
            remove_run_files(out, state)
            state = RunFolderState("new")
        elif strip(previous) != strip(config):
            raise RunSettingsChanged(
                f"{out} holds a run made with different settings (differs in: {', '.join(changed)}); "
                "use another --out or pass --overwrite to start over", changed,
            )
    elif state.kind == "marked" and any((out / name).exists() for name in ("records", "items", RESULTS_NAME)):
        raise RunFolderError(f"{out} holds results but no {CONFIG_NAME}, so their settings are unknown; "
                             "pass --overwrite to start over or use another --out")
    if state.kind != "marked":  # a new run (a new run id), or a run folder of an earlier cyclex resumed
        write_marker(out)
    write_json_atomic(path, config)


def _finished_any_item(out: Path) -> bool:
    """Whether a run in `out` finished an item or an image (a record file exists)."""
    records = out / "records"
    return records.is_dir() and any(p.suffix == ".json" for p in records.rglob("*"))


def _holding_run_lock(run):
    """Run `run` (whose `out` argument is a run folder) holding that folder's run lock from start to end."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def locked(*args, **kwargs):
        with locked_run_folder(Path(signature.bind(*args, **kwargs).arguments["out"])):
            return run(*args, **kwargs)

    return locked


def _write_item(out: Path, record: Mapping[str, Any], result: CycleResult, settings: dict[str, Any]) -> dict[str, Any]:
    """PNGs and maps of one item, then its record (written last: it marks the item finished)."""
    image_dir = safe_name(result.image_id)
    rel = Path("items") / image_dir / finding_slug(result.finding)
    files = {
        "query": rel / "query.png",
        "counterfactual": rel / "counterfactual.png",
        "difference": rel / "difference.png",
        "frame": rel / "frame.png",
        "frame_mask": rel / "frame_mask.png",
        "signed_npy": rel / "signed.npy",
        "positive_npy": rel / "positive.npy",
    }
    write_png_atomic(out / files["query"], result.query)
    write_png_atomic(out / files["counterfactual"], result.counterfactual)
    write_png_atomic(out / files["difference"], show_map_on_image(result.query, normalize_map(result.positive)))
    write_png_atomic(out / files["frame"], draw_frame(result.query, result.frame))
    write_png_atomic(out / files["frame_mask"], np.uint8(result.frame.mask) * 255)
    write_npy_atomic(out / files["signed_npy"], result.difference)
    write_npy_atomic(out / files["positive_npy"], result.positive)
    if result.reference is not None:  # difference_reference="reconstruction": the maps' reference R
        files["reconstruction"] = rel / "reconstruction.png"
        write_png_atomic(out / files["reconstruction"], result.reference)
    if result.original is not None:  # the query was fitted to the SD's side: overlays on the image as given
        files.update(write_original_overlays(out, rel, result))
    for name, array in result.extras.items():
        key = f"{safe_name(name)}_npy"
        files[key] = rel / f"{safe_name(name)}.npy"
        write_npy_atomic(out / files[key], array)
        picture = np.squeeze(array)
        if picture.shape == result.query.shape:  # a map over the image (RSE's guidance map): drawn like the difference
            files[safe_name(name)] = rel / f"{safe_name(name)}.png"
            write_png_atomic(out / files[safe_name(name)], show_map_on_image(result.query, normalize_map(picture)))
    masks = record.get("masks") or {}
    mask_source = masks.get(result.finding)
    line = result.to_record()
    line.pop("maker", None)
    timings = result.maker_details.get("seconds_per_item", {})
    line.update({
        "files": {k: str(v) for k, v in files.items()},
        "settings": settings,
        "maker_details": {k: v for k, v in result.maker_details.items() if k != "seconds_per_item"},
        "timings": timings,
        "mask_png": None,
    })
    line.update({f"{k}_png" if not k.endswith("_npy") else k: str(v) for k, v in files.items()})
    if mask_source:
        mask_path = Path(mask_source)
        if not mask_path.is_file():
            raise FileNotFoundError(f"record {result.image_id!r}: mask for {result.finding} at {mask_path} does not exist")
        target = rel / "mask.png"
        write_bytes_atomic(out / target, mask_path.read_bytes())
        line["mask_png"] = str(target)
    for key in ("shortcut", "shortcut_box", "alignment_chest_box"):
        if key in record:
            line[key] = to_json_safe(record[key])
    if record.get("shortcut_mask"):  # phantoms: where the spurious marker is, for shortcut audits
        marker = Path(record["shortcut_mask"])
        if not marker.is_file():
            raise FileNotFoundError(f"record {result.image_id!r}: shortcut mask {marker} does not exist")
        write_bytes_atomic(out / rel / "shortcut_mask.png", marker.read_bytes())
        line["shortcut_mask_png"] = str(rel / "shortcut_mask.png")
    line = to_json_safe(line)
    write_json_atomic(out / "records" / image_dir / f"{finding_slug(result.finding)}.json", line)
    return line


def _finished(out: Path, image_id: str) -> tuple[bool, set[str]]:
    folder = out / "records" / safe_name(image_id)
    if not folder.is_dir():
        return False, set()
    done = {json.loads(p.read_text())["finding"] for p in folder.glob("*.json") if not p.name.startswith("_")}
    return (folder / "_complete.json").is_file(), done


def collect_results(out: Path, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Finished result lines in input order, findings in vocabulary order."""
    lines = []
    for record in records:
        folder = out / "records" / safe_name(str(record["id"]))
        if not folder.is_dir():
            continue
        items = [json.loads(p.read_text()) for p in folder.glob("*.json") if not p.name.startswith("_")]
        items.sort(key=lambda r: ABNORMALITIES.index(r["finding"]))
        lines.extend(items)
    return lines


def _write_results(out: Path, records: Sequence[Mapping[str, Any]], config: Mapping[str, Any],
                   seconds: float) -> dict[str, Any]:
    lines = collect_results(out, records)
    write_text_atomic(out / RESULTS_NAME, "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    complete = sum((out / "records" / safe_name(str(r["id"])) / "_complete.json").is_file() for r in records)
    rate = cyclic_rate(lines)
    summary = {
        **rate,
        "n_images": len(records),
        "n_images_done": complete,
        "n_collateral_added": sum(bool(line["collateral_added"]) for line in lines),
        "n_collateral_lost": sum(bool(line["collateral_lost"]) for line in lines),
        "settings": dict(config),
        "seconds_this_run": round(seconds, 3),
        "results": RESULTS_NAME,
        # images the generator failed on (RUN/skipped.jsonl): not done, a rerun redoes them
        "n_images_failed": len(SkippedItems(out).of_stage(GENERATOR_STAGE)),
        # queries that could not be read or are too small (RUN/skipped.jsonl, stage "image")
        "n_images_skipped": len(SkippedItems(out).of_stage(IMAGE_STAGE)),
        # who made these numbers: cyclex version, commit, libraries, device, date, labeler, frame rule, scorers
        "provenance": run_provenance(config),
    }
    write_json_atomic(out / SUMMARY_NAME, summary)
    return summary


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]explain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


ExplainQuery = tuple[Mapping[str, Any], set[str]]  # a record and the findings of it already finished


def check_records(records: Sequence[Mapping[str, Any]]) -> None:
    """Every record has a non-empty, unique "id" (ValueError naming the first repeats otherwise)."""
    ids = [str(r.get("id", "")) for r in records]
    if any(not i for i in ids):
        raise ValueError("every record needs a non-empty 'id'")
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"image ids must be unique; repeated: {duplicates[:5]}")


def wanted_findings(findings: Sequence[str] | None) -> list[str] | None:
    """The findings to remove in vocabulary order (None: every present one)."""
    return sorted({canonical_finding(f) for f in findings}, key=ABNORMALITIES.index) if findings else None


def run_config(explainer: CyclicExplainer, records: Sequence[Mapping[str, Any]], *,
               findings: Sequence[str] | None = None, batch_size: int = 8, image_size: int | None = None,
               run_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's run_config.json: the same on every process of a run (it holds no process count)."""
    return to_json_safe({
        **dict(run_settings or {}),
        **explainer.settings(),
        "findings": wanted_findings(findings),
        "image_size": image_size,
        "batch_size": batch_size,
        "images": len(records),
    })


def result_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings each result line carries: the run's, less those that do not change results."""
    return {k: v for k, v in config.items() if k not in _NON_RESULT_SETTINGS}


def start_run_folder(out: Path, config: dict[str, Any], *, overwrite: bool = False,
                     explain_settings: ExplainSettings | None = None) -> None:
    """Make `out` this run's folder (run lock held by the caller): settings check, marker, settings files."""
    _check_config(out, config, overwrite)
    if explain_settings is not None:
        write_json_atomic(out / EXPLAIN_SETTINGS_NAME, to_json_safe(explain_settings.to_dict()))


def queries_left(out: Path, records: Sequence[Mapping[str, Any]], skipped: SkippedItems) -> list[ExplainQuery]:
    """The records not finished yet, with their finished findings; unreadable or tiny queries go to `skipped`."""
    todo = []
    for record in records:
        complete, done = _finished(out, str(record["id"]))
        if not complete:
            todo.append((record, done))
    readable = []
    for record, done in todo:  # one unreadable or tiny image is listed and skipped, never ends the run
        problem = query_image_problem(record.get("image"))
        if problem is None:
            skipped.clear(str(record["id"]), IMAGE_STAGE)
            readable.append((record, done))
        else:
            logger.warning("skipping image %r: %s (listed in %s)", str(record["id"]), problem, out / SKIPPED_NAME)
            skipped.add(record, IMAGE_STAGE, problem)
    return readable


BatchPart = tuple[Sequence[ExplainQuery], list[CycleResult] | None, BaseException | None]


def explain_batch(explainer: CyclicExplainer, queries: Sequence[ExplainQuery], *,
                  findings: Sequence[str] | None = None, image_size: int | None = None) -> list[BatchPart]:
    """The per-batch work (STYLE 18): queries in, results out, nothing written and nothing kept.

    queries: (record, finished findings) pairs; findings: the wanted findings (None: every present
    one), of which the finished ones are not redone. Returns [(part, results, None) or (part, None,
    error)] covering `queries`: a batch the generator fails on is explained again image by image
    (`explain_isolating_faults`), so an error names only the images it happened on. A plain loop
    (`run_explainer`), accelerate's processes (`cyclex.cycle.distributed`) and Ray Data
    (`cyclex.cycle.ray_engine`) all call this, so they make the same results.
    """
    wanted = wanted_findings(findings)

    def explain_part(part):
        # per image: the wanted findings not finished yet (explain keeps those present in the report)
        per_image = [[f for f in (wanted or ABNORMALITIES) if f not in done] for _, done in part]
        boxes = [tuple(r["chest_box"]) if r.get("chest_box") is not None else None for r, _ in part]
        return explainer.explain(
            [r["image"] for r, _ in part], findings=per_image, chest_boxes=boxes,
            image_ids=[str(r["id"]) for r, _ in part], image_size=image_size,
        )

    return explain_isolating_faults(queries, explain_part)


def write_batch(out: Path, parts: Sequence[BatchPart], settings: dict[str, Any], skipped: SkippedItems) -> int:
    """Write what `explain_batch` made: one atomic file per item, then each image's _complete.json.

    A failed part's images go to `skipped` (not complete: a rerun redoes them). Returns the items written.
    """
    written = 0
    for part, results, error in parts:
        if error is not None:  # not complete: a rerun redoes these images
            logger.warning("generator failed on %s: %s (listed in %s; a rerun retries them)",
                           ", ".join(repr(str(r["id"])) for r, _ in part), error, out / SKIPPED_NAME)
            for record, _ in part:
                skipped.add(record, GENERATOR_STAGE, error)
            continue
        for result in results:
            _write_item(out, part[result.image_index][0], result, settings)
            written += 1
        for record, _ in part:
            _, done = _finished(out, str(record["id"]))
            write_json_atomic(out / "records" / safe_name(str(record["id"])) / "_complete.json",
                              {"id": str(record["id"]), "findings": sorted(done, key=ABNORMALITIES.index)})
            skipped.clear(str(record["id"]))
    return written


@_holding_run_lock
def run_explainer(
    explainer: CyclicExplainer,
    records: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    findings: Sequence[str] | None = None,
    batch_size: int = 8,
    image_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    run_settings: Mapping[str, Any] | None = None,
    explain_settings: ExplainSettings | None = None,
    generator_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Explain every record with `explainer` into the run folder `out`; returns the summary dict.

    records: dicts with "id", "image" (path or (H, W) array in [0, 1]) and optionally "chest_box"
    (x0, y0, x1, y1) and "masks" ({finding: mask png path}). findings: restrict removals to these.
    run_settings: extra settings recorded in run_config.json (generator spec, tailored folder ...).
    explain_settings: the typed settings the run was built from, saved as RUN/explain_settings.json.
    generator_timeout_s: seconds one generator call may take (None: no limit).
    Generator faults (it raises, exits, hangs past the timeout, answers None, a wrong count, non-strings
    or an empty report) fail only the images they happen on (`generator_faults`): those are listed in
    RUN/skipped.jsonl (summary "n_images_failed") and not marked complete, so a rerun redoes them.
    The same run on several processes: `cyclex.cycle.distributed.run_explainer_distributed`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    check_records(records)
    config = run_config(explainer, records, findings=findings, batch_size=batch_size, image_size=image_size,
                        run_settings=run_settings)
    start_run_folder(out, config, overwrite=overwrite, explain_settings=explain_settings)
    settings = result_settings(config)
    # maker hooks (the search logs its attempts and ablation tables into the run folder; no-ops otherwise)
    explainer.maker.start_run(out)
    start = time.perf_counter()
    skipped = SkippedItems(out)
    todo = queries_left(out, records, skipped)
    logger.info("%s: %d of %d images left to explain", out, len(todo), len(records))
    skipped.write()

    with guarded_generator(explainer, generator_timeout_s), _progress(progress) as bar:
        task = bar.add_task("explain", total=len(records), completed=len(records) - len(todo))
        for start_index in range(0, len(todo), batch_size):
            chunk = todo[start_index:start_index + batch_size]
            write_batch(out, explain_batch(explainer, chunk, findings=findings, image_size=image_size), settings,
                        skipped)
            skipped.write()
            _write_results(out, records, config, time.perf_counter() - start)
            bar.advance(task, len(chunk))
    explainer.maker.finish_run(out)
    return _write_results(out, records, config, time.perf_counter() - start)


MIN_QUERY_SIDE = 16  # pixels: smaller queries would be scaled up to a flat grey and "explained"


def query_image_problem(image: Any) -> ImageProblem | None:
    """Why a query cannot be explained (unreadable file, not an image, under MIN_QUERY_SIDE), or None."""
    if isinstance(image, (str, os.PathLike)):
        try:
            array = read_image(image)
        except (ImageReadError, OSError, ValueError) as error:
            return ImageProblem(str(error))
        shape = array.shape
        where = f"{os.fsdecode(image)!r}"
    else:
        shape = tuple(getattr(image, "shape", ()))[-2:]
        where = "the image"
        if len(shape) != 2:
            return None  # arrays, tensors and PIL images are checked by the engine itself
    if min(shape) < MIN_QUERY_SIDE:
        return ImageProblem(f"{where} is {shape[1]} x {shape[0]} pixels; cyclex explains images of at least "
                            f"{MIN_QUERY_SIDE} x {MIN_QUERY_SIDE}")
    return None


class ImageProblem(ValueError):
    """A query cyclex skips (listed in RUN/skipped.jsonl with stage "image")."""


def load_labeler_spec(spec: str):
    """A labeler from "rules", "chexbert:PATH[::TOKENIZER]" (C2 `load_labeler`) or "python:module:attr"
    (an object with .label, or a class / zero-argument factory making one)."""
    if spec.startswith("python:"):
        import importlib

        module_name, sep, attribute = spec[len("python:"):].rpartition(":")
        if not sep or not module_name:
            raise ValueError(f"labeler spec {spec!r}: expected python:package.module:attribute")
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ValueError(f"labeler spec {spec!r}: {module_name} has no attribute {attribute!r}")
            target = getattr(target, part)
        labeler = target if hasattr(target, "label") and not isinstance(target, type) else target()
        if not hasattr(labeler, "label"):
            raise ValueError(f"labeler spec {spec!r} did not give an object with .label(reports)")
        return labeler
    from cyclex.labelers import load_labeler

    return load_labeler(spec)


@dataclass
class PreparedRun:
    """What `run_explain` hands the run folder: the built explainer, the records, the settings to record."""

    explainer: CyclicExplainer
    records: list[dict[str, Any]]
    settings: ExplainSettings
    run_settings: dict[str, Any]

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `run_explainer` (and its distributed and Ray drivers) for this run."""
        return {"findings": self.settings.findings, "batch_size": self.settings.batch_size,
                "image_size": self.explainer.image_size, "run_settings": self.run_settings,
                "explain_settings": self.settings}


def prepare_run(
    generator,
    tailored_dir: str | Path,
    records: Sequence[Mapping[str, Any]] | str | Path,
    settings: ExplainSettings | None = None,
    *,
    labeler=None,
    labeler_spec: str | None = None,
    generator_spec: str | None = None,
    maker_kwargs: Mapping[str, Any] | None = None,
    scorer=None,
    generator_version: str | None = None,
    device=None,
    **overrides: Any,
) -> PreparedRun:
    """Load the tailored SD, build the explainer and the run settings (`run_explain`'s first half).

    device: overrides `settings.device` (each process of a distributed run passes its own).
    """
    settings = (settings if settings is not None else ExplainSettings()).with_overrides(**overrides)
    if isinstance(records, (str, Path)):
        source = str(records)
        records = load_image_records(records)
    else:
        source = None
    if labeler is None and labeler_spec:
        labeler = load_labeler_spec(labeler_spec)
    searching = settings.search is not None
    explainer = CyclicExplainer.from_pretrained(
        tailored_dir, generator=generator, labeler=labeler, variant=settings.variant, checkpoint=settings.checkpoint,
        device=device if device is not None else settings.device,
        explainer_kwargs={**settings.frames.explainer_kwargs(), "difference_reference": settings.difference_reference,
                          "image_size": settings.image_size, "resize": settings.resize},
        search=searching, search_kwargs=settings.search.maker_kwargs() if searching else None, scorer=scorer,
        num_inference_steps=settings.steps, guidance_scale=settings.guidance, strength=settings.strength,
        **dict(maker_kwargs or {}),
    )
    run_settings = {
        "generator": generator_spec or getattr(getattr(generator, "info", None), "name", type(generator).__name__),
        "labeler": labeler_spec or type(explainer.labeler).__name__,
        "tailored": str(Path(tailored_dir).resolve()),
        "checkpoint": None if searching else settings.checkpoint,
        "images_source": source,
        **({"scorers": scorer.describe()} if callable(getattr(scorer, "describe", None)) else {}),
        # only when known, so runs keyed on the spec alone resume as before
        **({"generator_version": generator_version} if generator_version is not None else {}),
    }
    return PreparedRun(explainer, [dict(r) for r in records], settings, run_settings)


def run_explain(
    generator,
    tailored_dir: str | Path,
    records: Sequence[Mapping[str, Any]] | str | Path,
    out: str | Path,
    settings: ExplainSettings | None = None,
    *,
    labeler=None,
    labeler_spec: str | None = None,
    generator_spec: str | None = None,
    maker_kwargs: Mapping[str, Any] | None = None,
    scorer=None,
    overwrite: bool = False,
    progress: bool = True,
    generator_timeout_s: float | None = None,
    generator_version: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Load the tailored SD, explain `records` (or the folder / CSV they come from) into `out`.

    The one call behind `cyclex explain` and the demo. Returns the summary dict (also summary.json).
    settings: an `ExplainSettings` (default: its defaults); `overrides` change single fields with
    the flat names `ExplainSettings.with_overrides` takes (steps=, guidance=, frame_threshold=,
    difference_reference=, search=True, search_kwargs={...}, ...). The settings are saved to
    RUN/explain_settings.json.
    scorer: the search's `CounterfactualScorer` (with `settings.search`); its attempts go to
    RUN/search_attempts.jsonl and its ablation tables to RUN/search_ablation.json.
    maker_kwargs: extra keyword arguments of the variant's factory (e.g. attention_control).
    generator_timeout_s: seconds one generator call may take (None: no limit; `run_explainer`).
    generator_version: what identifies the generator's weights beyond its spec (a sha256 of its
    weight files, or a version text); part of the resume key, so a run of other weights is refused.
    On several processes: `cyclex.cycle.distributed.run_explain_distributed` (same arguments).
    """
    prepared = prepare_run(generator, tailored_dir, records, settings, labeler=labeler, labeler_spec=labeler_spec,
                           generator_spec=generator_spec, maker_kwargs=maker_kwargs, scorer=scorer,
                           generator_version=generator_version, **overrides)
    return run_explainer(prepared.explainer, prepared.records, out, overwrite=overwrite, progress=progress,
                         generator_timeout_s=generator_timeout_s, **prepared.run_kwargs())


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The result lines of a run folder."""
    path = Path(out) / RESULTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {out} a cyclex run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def iter_items(out: str | Path) -> Iterable[tuple[dict[str, Any], Path]]:
    """(result line, item folder) pairs, for report writers."""
    root = Path(out)
    for line in read_results(root):
        yield line, root / Path(line["files"]["query"]).parent
