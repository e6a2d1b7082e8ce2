"""Baseline maps beside a run's frames (`--baseline gradcam`): Grad-CAM of the generator's image encoder.

`write_gradcam_baselines(RUN, generator)` reads RUN/results.jsonl and, for every image x finding, makes
the Grad-CAM (`cyclex.explain.gradcam.ReportGradCAM`) of the query on the teacher-forced
log-probability of the finding's words in the report the generator wrote for it (`report_before`;
the words are the finding's positive or uncertain mentions, found by the rule labeler). It writes,
beside the item's PNGs, `gradcam.npy` ((H, W) float32 in [0, 1]) and `gradcam.png` (the map over the
query, pytorch-grad-cam's `show_cam_on_image`), and RUN/baselines.json (method, target, generator,
counts, provenance). The run and audit pages show `gradcam.png` next to the frame where it exists.

Cyclic engine layer: the generator comes in as an object (the CLI loads it from its spec).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cyclex.atomic_io import write_json_atomic, write_npy_atomic, write_png_atomic
from cyclex.cycle.run_folder import read_results
from cyclex.findings import LabelState

logger = logging.getLogger(__name__)

__all__ = ["BASELINES", "BASELINES_JSON", "check_baseline", "GRADCAM_NPY", "GRADCAM_PNG", "gradcam_overlay", "write_gradcam_baselines",
           "write_baselines"]

BASELINES = ("gradcam",)
BASELINES_JSON = "baselines.json"
GRADCAM_PNG = "gradcam.png"
GRADCAM_NPY = "gradcam.npy"
TARGET = ("teacher-forced log-probability of the finding's words (its positive or uncertain mentions, rule "
          "labeler) in the generator's report on the query")


def gradcam_overlay(query: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the (H, W) query in [0, 1] under the (H, W) map in [0, 1] as a jet heat map."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    query = np.clip(np.asarray(query, dtype=np.float32), 0, 1)
    return show_cam_on_image(np.stack([query] * 3, axis=-1), np.clip(cam, 0, 1).astype(np.float32), use_rgb=True)


def _finding_spans(mentions, report: str, finding: str) -> list[tuple[int, int]]:
    present = (LabelState.POSITIVE, LabelState.UNCERTAIN)
    return [(int(m.start_char), int(m.end_char)) for m in mentions(report)
            if m.finding == finding and m.state in present]


def write_gradcam_baselines(run: str | os.PathLike, generator: Any, *, labeler: Any = None,
                            batch_size: int = 16) -> dict[str, Any]:
    """Grad-CAM baselines for every item of `run` (see the module docstring); returns baselines.json's content.

    generator: the run's generator, an encoder-decoder `HFImageToTextGenerator`; labeler: finds the
    finding's mentions (`.mentions(report)`, default `RuleLabeler`).
    """
    import cv2

    from cyclex.explain.gradcam import ReportGradCAM, require_gradcam
    from cyclex.provenance import environment

    require_gradcam()
    root = Path(run)
    lines = read_results(root)
    if labeler is None:
        from cyclex.labelers import RuleLabeler

        labeler = RuleLabeler()
    explainer = ReportGradCAM.from_generator(generator)
    n_without_words = 0
    for start in range(0, len(lines), batch_size):
        batch = lines[start:start + batch_size]
        queries = []
        for line in batch:
            path = root / line["query_png"]
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise FileNotFoundError(f"{root}: item {line['image_id']!r} / {line['finding']}: query {path} is "
                                        "missing or not an image")
            queries.append(image.astype(np.float32) / 255.0)
        if len({q.shape for q in queries}) != 1:  # queries of one run share the SD's size unless --resize none
            groups: Sequence[Sequence[int]] = [[i] for i in range(len(batch))]
        else:
            groups = [list(range(len(batch)))]
        reports = [" ".join(str(line["report_before"]).split()) for line in batch]
        spans = [_finding_spans(labeler.mentions, report, line["finding"]) for report, line in zip(reports, batch,
                                                                                                    strict=True)]
        n_without_words += sum(not s for s in spans)
        for group in groups:
            maps = explainer(np.stack([queries[i] for i in group]), [reports[i] for i in group], [spans[i] for i in group])
            for i, cam in zip(group, maps, strict=True):
                folder = (root / batch[i]["query_png"]).parent
                write_npy_atomic(folder / GRADCAM_NPY, cam)
                write_png_atomic(folder / GRADCAM_PNG, gradcam_overlay(queries[i], cam))
    layer = next((name for name, module in explainer.model.named_modules() if module is explainer.target_layer), None)
    record = {"method": "gradcam", "library": "pytorch-grad-cam (GradCAM)", "target": TARGET, "target_layer": layer,
              "generator": getattr(getattr(generator, "info", None), "name", type(generator).__name__),
              "n_items": len(lines), "n_items_without_finding_words": n_without_words,
              "files": {"map": GRADCAM_NPY, "overlay": GRADCAM_PNG}, "provenance": environment()}
    write_json_atomic(root / BASELINES_JSON, record)
    logger.info("Grad-CAM baselines for %d items of %s", len(lines), root)
    return record


def check_baseline(baseline: str | None) -> None:
    """Refuse a baseline name other than None or one of `BASELINES`."""
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")


def write_baselines(baseline: str | None, runs: dict[str, str | os.PathLike], generators: dict[str, Any]) -> None:
    """Write `baseline` ("gradcam" or None: nothing) for each run name -> folder, with generators[name]."""
    check_baseline(baseline)
    if baseline is None:
        return
    missing = sorted(set(runs) - set(generators))
    if missing:
        raise ValueError(f"--baseline {baseline}: no generator for the runs {missing}")
    for name, run in runs.items():
        write_gradcam_baselines(run, generators[name])
