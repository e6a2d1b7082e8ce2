"""`cyclex explain --engine ray`: the same run folder through Ray Data (`pip install cyclex[ray]`).

    cyclex explain --engine ray --num-processes 4 --ray-num-gpus 1 ...   (4 workers, one GPU each)

The driver (this process) takes the run lock, checks or writes the settings (`run_config.json`,
`explain_settings.json`) exactly as a single-process run does, and lists the images left. Those go
into a `ray.data` dataset; `map_batches` hands batches of `batch_size` images to `ExplainWorker`, a
callable class that builds the explainer once per worker (in `__init__`) and runs the per-batch
function every driver shares (`run_folder.explain_batch`), then writes each item atomically to its
own files (`run_folder.write_batch`: RUN/items, RUN/records), so the folder is the one a plain or an
accelerate run makes and a resume works the same. Workers answer one row per image (its id and, if
the generator failed on it, its skipped line); the driver writes `skipped.jsonl`, then merges
`results.jsonl` and `summary.json` from the record files in input order.

Ray is never imported by the rest of cyclex; without it this module raises ImportError naming the extra.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cyclex.counterfactuals.base import CounterfactualMaker
from cyclex.cycle.explainer import CyclicExplainer
from cyclex.cycle.generator_faults import SkippedItems, guarded_generator
from cyclex.cycle.run_folder import (
    RunFolderError,
    _write_results,
    check_records,
    explain_batch,
    locked_run_folder,
    prepare_run,
    queries_left,
    result_settings,
    run_config,
    start_run_folder,
    write_batch,
)
from cyclex.cycle.settings import ExplainSettings
from cyclex.jsonl import to_json_safe

logger = logging.getLogger(__name__)


def _refuse_run_logging_maker(maker: CounterfactualMaker) -> None:
    """Ray workers run in processes of their own without a rank: a maker logging into the run folder
    (the search's search_attempts.jsonl) is refused there; accelerate's ranks log per rank instead."""
    if type(maker).start_run is not CounterfactualMaker.start_run:
        raise RunFolderError(f"{type(maker).__name__} logs into the run folder (the search's search_attempts.jsonl), "
                             "which Ray workers cannot share; run it with accelerate (--num-processes N) or one "
                             "process (no --engine ray)")


def import_ray():
    """`ray` with Ray Data, or ImportError saying how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the part cyclex uses)
    except ImportError as error:
        raise ImportError(f"--engine ray needs Ray Data: pip install 'cyclex[ray]' ({error})") from error
    return ray


class _SkippedInMemory(SkippedItems):
    """The skipped lines of one worker batch, kept in memory (the driver writes RUN/skipped.jsonl)."""

    def __init__(self) -> None:  # no file: nothing read, nothing written
        self.path = None
        self.lines = {}

    def write(self) -> None:
        raise RuntimeError("a Ray worker never writes skipped.jsonl; its lines go back to the driver")


class ExplainWorker:
    """Ray Data's callable class: the models load once per worker, then batch after batch is explained.

    build_explainer: a picklable zero-argument callable making the `CyclicExplainer` (on the worker).
    Batches are {"record": JSON text, "done": JSON list of finished findings} columns; the answer is
    {"id", "failed"} per image ("failed": the skipped-list line as JSON text, "" when it succeeded).
    """

    def __init__(self, build_explainer: Callable[[], CyclicExplainer], out: str, settings: dict[str, Any],
                 findings: Sequence[str] | None, image_size: int | None, generator_timeout_s: float | None) -> None:
        self.explainer = build_explainer()
        self.out = Path(out)
        self.settings = settings
        self.findings = findings
        self.image_size = image_size
        self.generator_timeout_s = generator_timeout_s

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        queries = [(json.loads(str(r)), set(json.loads(str(d)))) for r, d in zip(batch["record"], batch["done"],
                                                                                   strict=True)]
        skipped = _SkippedInMemory()
        with guarded_generator(self.explainer, self.generator_timeout_s):
            parts = explain_batch(self.explainer, queries, findings=self.findings, image_size=self.image_size)
            write_batch(self.out, parts, self.settings, skipped)
        ids = [str(record["id"]) for record, _ in queries]
        failed = [json.dumps(skipped.lines[i], sort_keys=True) if i in skipped.lines else "" for i in ids]
        return {"id": np.array(ids, dtype=object), "failed": np.array(failed, dtype=object)}


def run_explainer_ray(
    build_explainer: Callable[[], CyclicExplainer],
    records: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    explainer: CyclicExplainer | None = None,
    findings: Sequence[str] | None = None,
    batch_size: int = 8,
    image_size: int | None = None,
    overwrite: bool = False,
    run_settings: Mapping[str, Any] | None = None,
    explain_settings: ExplainSettings | None = None,
    generator_timeout_s: float | None = None,
    num_workers: int = 1,
    num_gpus: float = 0.0,
    address: str | None = None,
) -> dict[str, Any]:
    """Explain `records` into the run folder `out` on Ray Data workers; returns the summary dict.

    build_explainer: picklable, makes the explainer on each worker. explainer: the driver's copy for
    the run settings (default: one built here). num_workers: `map_batches` concurrency; num_gpus: per
    worker. address: a running Ray cluster (None: a local instance, started and stopped here).
    """
    ray = import_ray()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    out = Path(out)
    check_records(records)
    explainer = explainer if explainer is not None else build_explainer()
    _refuse_run_logging_maker(explainer.maker)
    config = run_config(explainer, records, findings=findings, batch_size=batch_size, image_size=image_size,
                        run_settings=run_settings)
    with locked_run_folder(out):
        start_run_folder(out, config, overwrite=overwrite, explain_settings=explain_settings)
        start = time.perf_counter()
        skipped = SkippedItems(out)
        todo = queries_left(out, records, skipped)
        skipped.write()
        logger.info("%s: %d of %d images left to explain on %d Ray workers", out, len(todo), len(records), num_workers)
        if todo:
            started_here = not ray.is_initialized()
            if started_here:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            try:
                rows = [{"record": json.dumps(to_json_safe(dict(r))), "done": json.dumps(sorted(done))}
                        for r, done in todo]
                answers = ray.data.from_items(rows).map_batches(
                    ExplainWorker, batch_size=batch_size, batch_format="numpy", concurrency=num_workers,
                    num_gpus=num_gpus or None,
                    fn_constructor_kwargs={"build_explainer": build_explainer, "out": str(out),
                                           "settings": result_settings(config), "findings": findings,
                                           "image_size": image_size, "generator_timeout_s": generator_timeout_s},
                ).take_all()
            finally:
                if started_here:
                    ray.shutdown()
            for answer in answers:  # the workers' verdicts on each image, in whatever order they came
                image_id = str(answer["id"])
                if answer["failed"]:
                    skipped.lines[image_id] = json.loads(answer["failed"])
                else:
                    skipped.clear(image_id)
            skipped.write()
        summary = _write_results(out, records, config, time.perf_counter() - start)
        summary["processes"] = {"engine": "ray", "num_workers": num_workers, "num_gpus_per_worker": num_gpus}
        from cyclex.atomic_io import write_json_atomic
        from cyclex.cycle.run_folder import SUMMARY_NAME

        write_json_atomic(out / SUMMARY_NAME, summary)
        return summary


def _build_explainer(make_generator: Callable[[], Any], tailored_dir: str, settings: ExplainSettings | None,
                     prepare_kwargs: Mapping[str, Any]) -> CyclicExplainer:
    return prepare_run(make_generator(), tailored_dir, [], settings, **dict(prepare_kwargs)).explainer


def run_explain_ray(
    make_generator: Callable[[], Any],
    tailored_dir: str | Path,
    records,
    out: str | Path,
    settings: ExplainSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    generator_timeout_s: float | None = None,
    num_workers: int = 1,
    num_gpus: float = 0.0,
    address: str | None = None,
    **prepare_kwargs: Any,
) -> dict[str, Any]:
    """`run_explain` on Ray Data: make_generator (picklable, no arguments) builds the generator on each worker.

    prepare_kwargs: those of `run_folder.prepare_run` (labeler_spec=, generator_spec=, ...); a scorer
    object (the search) is refused, as on several accelerate processes. progress: unused (Ray shows its own).
    """
    del progress
    prepared = prepare_run(make_generator(), tailored_dir, records, settings, **prepare_kwargs)
    build = partial(_build_explainer, make_generator, str(tailored_dir), prepared.settings, prepare_kwargs)
    return run_explainer_ray(build, prepared.records, out, explainer=prepared.explainer, overwrite=overwrite,
                             generator_timeout_s=generator_timeout_s, num_workers=num_workers, num_gpus=num_gpus,
                             address=address, **prepared.run_kwargs())
