"""Add the metric core's numbers to a cyclic-engine run folder (what `cyclex evaluate RUN` does).

Run folder (written by the engine): `RUN/results.jsonl`, one JSON object per image x finding with at
least `image_id`, `finding`, `verified`, `query_png`, `counterfactual_png` (paths relative to RUN),
`chest_box` ([x0, y0, x1, y1] or null: the box the maps were masked to) or `alignment_chest_box`
(the image's chest box when maps and frames cover the whole image, as in `cyclex demo`: a shortcut
outside the chest stays visible, alignment is still measured inside the box, SPEC section 2), and
optionally `mask_png` (phantom ground truth), `signed_npy` (the float32 map I - CF, used instead of the
8-bit PNGs when present), `positive_npy` (the smoothed positive map cyclex saves), `shortcut_mask_png`
(the spurious marker) and `frame` (its components); and `RUN/summary.json`.

Outputs: `RUN/metrics.jsonl` (one line per results line: its keys `image_id`, `finding`,
`verified` plus the metrics), a "metrics" entry in `RUN/summary.json` (aggregates over all items
and over verified ones), and seed-000 figures in `RUN/figures/` (CPG histogram + CDF, hit-rate, ROC,
threshold-IoU curves). All files are written atomically.

Per item: pixel L1 / L2 (RMSE) / SSIM / PSNR, LPIPS (when an LPIPS metric is available), embedding
cosine / L1 / L2 (CLIP or a stand-in encoder), CPG, FET, CF_Score with each criterion passed, failed,
unavailable (no scorer, or the classifier has no class for the finding) or not applicable (the
threshold belongs to another scorer); every item counts in the acceptance denominator. The alignment
map is the positive part of query - counterfactual (seed 000's raw map; `map_kind="absolute"` for
|query - CF|), compared against the item's mask (or the annotation set's) in the chest box: NCC,
pixel AUC, AUC-IoU and top-k hits for the full mask, its boundary and its dilated boundary; the same
pixel AUC for the smoothed map cyclex saves (`full/auc_smoothed`); NCC with an eye-tracking heatmap
when one is given. Whole-image measures: the share of the positive map's mass outside the chest box
(`mass_outside_chest_box`), and on images with the spurious marker whether the frame's largest
component overlaps it (`marker/largest_component_overlaps`) and whether at least half of the map's
top-5 % mass lies on it (`marker/top5_mass_share`, `marker/top5_mass_on_marker`).

It takes loaded metric models (classifier, encoder, LPIPS) and their description (`scorer_provenance`,
written into the summary with `cyclex.provenance.environment()`); `cyclex.specs.scorers` turns the
CLI's specs ('phantom', 'xrv:...', 'clip:...') into them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cyclex.atomic_io import write_text_atomic as _atomic_write
from cyclex.explain import alignment, figures
from cyclex.explain.annotations import AnnotationSet, load_annotation_set, read_mask_png
from cyclex.explain.effectiveness import Classifier, counterfactual_probability_gain
from cyclex.explain.faithfulness import (
    ImageEncoder,
    LPIPSMetric,
    embedding_distances,
    pixel_l1,
    pixel_l2,
    psnr,
    ssim,
)
from cyclex.explain.scores import CRITERIA, CFThresholds, cf_score, fet_score
from cyclex.jsonl import read_jsonl, to_json_safe

logger = logging.getLogger(__name__)

__all__ = [
    "EvaluationConfig",
    "RunFormatError",
    "read_results",
    "evaluate_run",
    "difference_map",
    "alignment_chest_box",
    "mass_outside_box",
    "top_mass_share",
    "largest_component_overlaps",
    "MARKER_TOP_PERCENT",
    "MARKER_MASS_SHARE",
]

# Marker overlap, strict form (issue 16): at least MARKER_MASS_SHARE of the mass of the map's top
# MARKER_TOP_PERCENT % pixels lies on the marker.
MARKER_TOP_PERCENT = 5.0
MARKER_MASS_SHARE = 0.5

REQUIRED_KEYS = ("image_id", "finding", "verified", "query_png", "counterfactual_png")


class RunFormatError(ValueError):
    """The run folder does not have the layout the engine writes."""


@dataclass
class EvaluationConfig:
    map_kind: str = "positive"  # seed 000: positive part of F - CF; "absolute" = |F - CF|
    percentiles: tuple[float, ...] = alignment.DEFAULT_PERCENTILES
    iou_thresholds: tuple[float, ...] = alignment.DEFAULT_IOU_THRESHOLDS
    boundary_radius: int = 3  # dilation of the one-pixel contour, in pixels
    thresholds: CFThresholds = field(default_factory=CFThresholds)
    # CF_Score criteria whose threshold belongs to another scorer (`cyclex.specs.scorers.criteria_not_applicable`)
    not_applicable: tuple[str, ...] = ()
    draw_figures: bool = True



def read_results(run_dir: str | os.PathLike) -> list[dict]:
    """The records of RUN/results.jsonl, checked for the keys evaluation needs."""
    path = Path(run_dir) / "results.jsonl"
    if not path.is_file():
        raise RunFormatError(f"{path} not found: is {run_dir} a cyclex run folder?")
    return read_jsonl(path, REQUIRED_KEYS, error=RunFormatError)


def _read_image(run_dir: Path, record: dict, key: str) -> torch.Tensor:
    from PIL import Image

    path = run_dir / str(record[key])
    if not path.is_file():
        raise RunFormatError(f"{record['image_id']} / {record['finding']}: {key} file not found: {path}")
    with Image.open(path) as image:
        array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None, None]


def difference_map(query: torch.Tensor, counterfactual: torch.Tensor, kind: str = "positive") -> np.ndarray:
    """(H, W) map from (1, 1, H, W) images: max(F - CF, 0) ('positive', seed 000) or |F - CF| ('absolute')."""
    signed = (query - counterfactual)[0, 0].double().numpy()
    if kind == "positive":
        return np.clip(signed, 0.0, None)
    if kind == "absolute":
        return np.abs(signed)
    raise ValueError(f"map_kind must be 'positive' or 'absolute', got {kind!r}")


def _item_difference_map(run_dir: Path, record: dict, query: torch.Tensor, counterfactual: torch.Tensor,
                         kind: str) -> np.ndarray:
    """The engine's float32 signed map (I - CF, `signed_npy`) when present, else from the 8-bit PNGs."""
    signed_file = record.get("signed_npy")
    if signed_file and (run_dir / signed_file).is_file():
        signed = np.load(run_dir / signed_file, allow_pickle=False).astype(np.float64)
        if signed.shape == tuple(query.shape[-2:]) and np.isfinite(signed).all():
            if kind == "positive":
                return np.clip(signed, 0.0, None)
            if kind == "absolute":
                return np.abs(signed)
            raise ValueError(f"map_kind must be 'positive' or 'absolute', got {kind!r}")
        logger.warning("%s: ignoring %s (shape %s, expected %s)", record["image_id"], signed_file, signed.shape,
                       tuple(query.shape[-2:]))
    return difference_map(query, counterfactual, kind)


def alignment_chest_box(record: dict) -> list | None:
    """The chest box alignment is measured in: `alignment_chest_box` (maps on the whole image) or
    `chest_box` (the box the maps were masked to), None when the record has neither."""
    box = record.get("alignment_chest_box")
    return box if box is not None else record.get("chest_box")


def _chest_box(record: dict, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    box = alignment_chest_box(record)
    if box is None:
        return None
    if len(box) != 4:
        raise RunFormatError(f"{record['image_id']}: chest_box must be [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = shape
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def mass_outside_box(map_: np.ndarray, box: Sequence[int] | None) -> float | None:
    """Share of a non-negative (H, W) map's mass outside box (x0, y0, x1, y1); None without a box or mass."""
    map_ = np.clip(np.asarray(map_, dtype=np.float64), 0.0, None)
    total = float(map_.sum())
    if box is None or total <= 0:
        return None
    x0, y0, x1, y1 = (int(v) for v in box)
    return float(1.0 - map_[y0:y1, x0:x1].sum() / total)


def top_mass_share(map_: np.ndarray, region: np.ndarray, top_percent: float = MARKER_TOP_PERCENT) -> float | None:
    """Share of the mass of the map's top `top_percent` % pixels (by value) that lies in `region`.

    map_: (H, W) non-negative; region: (H, W) bool. The top set has ceil(top_percent % of H * W)
    pixels (ties broken by position). None when the top pixels carry no mass.
    """
    map_ = np.clip(np.asarray(map_, dtype=np.float64), 0.0, None)
    region = np.asarray(region, dtype=bool)
    if map_.shape != region.shape:
        raise ValueError(f"top_mass_share: map {map_.shape} and region {region.shape} differ in shape")
    flat = map_.ravel()
    k = max(1, math.ceil(top_percent / 100.0 * flat.size))
    top = np.argsort(flat, kind="stable")[::-1][:k]
    mass = float(flat[top].sum())
    return float(flat[top][region.ravel()[top]].sum() / mass) if mass > 0 else None


def largest_component_overlaps(frame: dict | None, region: np.ndarray) -> bool:
    """Whether the frame's largest component (its bounding box, as results.jsonl saves it) meets `region`."""
    components = (frame or {}).get("components") or []
    if not components:
        return False
    x, y, w, h = (int(v) for v in components[0]["bbox"])
    return bool(np.asarray(region, dtype=bool)[y:y + h, x:x + w].any())


def _finite_mean(values: Sequence) -> float | None:
    array = np.asarray([v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)], dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(array.mean()) if array.size else None


def _aggregate(rows: list[dict]) -> dict:
    numeric_keys = sorted({k for r in rows for k, v in r.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
    means = {k: _finite_mean([r.get(k) for r in rows]) for k in numeric_keys}
    means.pop("cf_score", None)
    out: dict = {"count": len(rows), "mean": means}
    scored = [r for r in rows if r.get("cf_score") is not None]
    if scored:
        n = len(scored)
        accepted = sum(r["cf_accepted"] is True for r in scored)
        undetermined = sum(r["cf_accepted"] is None for r in scored)
        out["cf_score_mean"] = float(np.mean([r["cf_score"] for r in scored]))
        # every item is in the denominator; with unavailable / not applicable criteria some are undetermined,
        # and the rate is then only known between its bounds
        out["acceptance"] = {"n": n, "accepted": accepted, "rejected": n - accepted - undetermined,
                             "undetermined": undetermined, "rate": accepted / n if not undetermined else None,
                             "bounds": [accepted / n, (accepted + undetermined) / n]}
        out["acceptance_rate"] = out["acceptance"]["rate"]
        criteria = {name: {"n": n, "passed": 0, "failed": 0, "unavailable": 0, "not_applicable": 0} for name in CRITERIA}
        for r in scored:
            for name in CRITERIA:
                state = ("failed" if name in r["cf_failed"] else "unavailable" if name in r["cf_unavailable"]
                         else "not_applicable" if name in r["cf_not_applicable"] else "passed")
                criteria[name][state] += 1
        out["criteria"] = criteria
        out["failed_criteria"] = {name: c["failed"] for name, c in criteria.items() if c["failed"]}
        out["unavailable_criteria"] = {name: c["unavailable"] for name, c in criteria.items() if c["unavailable"]}
        out["not_applicable_criteria"] = {name: c["not_applicable"] for name, c in criteria.items()
                                          if c["not_applicable"]}
    markers = [r for r in rows if "marker/largest_component_overlaps" in r]
    if markers:
        out["marker"] = {"n": len(markers),
                         "largest_component_overlaps": sum(r["marker/largest_component_overlaps"] for r in markers),
                         "top5_mass_on_marker": sum(r["marker/top5_mass_on_marker"] for r in markers)}
    return out


def _encoder_from(classifier: Classifier | None, encoder: ImageEncoder | None) -> ImageEncoder | None:
    if encoder is not None:
        return encoder
    return classifier if classifier is not None and hasattr(classifier, "encode") else None


@torch.no_grad()
def evaluate_run(run_dir: str | os.PathLike, *, classifier: Classifier | None = None,
                 encoder: ImageEncoder | None = None, lpips: LPIPSMetric | None = None,
                 annotations: AnnotationSet | str | os.PathLike | None = None,
                 config: EvaluationConfig | None = None, scorer_provenance: dict | None = None) -> dict:
    """Evaluate every item of a run folder; write metrics.jsonl, summary.json["metrics"], figures/.

    classifier: for CPG (target = the item's finding); encoder: for the embedding distances (defaults
    to the classifier's `encode` when it has one); lpips: optional; a missing one makes its criteria
    unavailable (counted, never failed). annotations: masks / boxes / ellipses / heatmaps used when an
    item has no `mask_png`. scorer_provenance: what each scorer is (`Scorers.describe()`); default: what
    `cyclex.provenance.describe_scorer` reads off the objects. Returns the "metrics" summary.
    """
    from cyclex.provenance import describe_scorer, environment

    config = config or EvaluationConfig()
    run_dir = Path(run_dir)
    records = read_results(run_dir)
    if isinstance(annotations, (str, os.PathLike)):
        annotations = load_annotation_set(annotations)
    encoder = _encoder_from(classifier, encoder)

    rows: list[dict] = []
    curve_inputs: dict[str, list] = defaultdict(list)  # for the pooled figures
    for record in records:
        query = _read_image(run_dir, record, "query_png")
        counterfactual = _read_image(run_dir, record, "counterfactual_png")
        if query.shape != counterfactual.shape:
            raise RunFormatError(f"{record['image_id']} / {record['finding']}: query {tuple(query.shape)} and "
                                 f"counterfactual {tuple(counterfactual.shape)} differ in size")
        shape = tuple(query.shape[-2:])
        row = {"image_id": record["image_id"], "finding": record["finding"], "verified": bool(record["verified"])}
        # 1. Faithfulness
        row["l1"] = float(pixel_l1(query, counterfactual)[0])
        row["l2"] = float(pixel_l2(query, counterfactual)[0])
        row["ssim"] = float(ssim(query, counterfactual)[0])
        row["psnr"] = float(psnr(query, counterfactual)[0])
        row["lpips"] = float(lpips(query, counterfactual)[0]) if lpips is not None else math.nan
        if encoder is not None:
            cosine, e_l1, e_l2 = embedding_distances(encoder.encode(query), encoder.encode(counterfactual))
            row.update(clip_cosine=float(cosine[0]), clip_l1=float(e_l1[0]), clip_l2=float(e_l2[0]))
        # 2. Effectiveness and acceptance
        if classifier is not None:
            try:
                row["cpg"] = float(counterfactual_probability_gain(classifier, query, counterfactual, record["finding"])[0])
            except KeyError as error:  # counted as unavailable below, never dropped
                logger.warning("no CPG for %s: %s", record["finding"], error)
        if "cpg" in row and "clip_l1" in row:
            row["fet"] = float(fet_score(row["cpg"], row["clip_l1"], row["clip_l2"]))
        result = cf_score(row["lpips"], row.get("clip_cosine"), row["l2"], row.get("cpg"), row.get("fet"),
                          config.thresholds, not_applicable=config.not_applicable)
        row.update(cf_score=result.score, cf_failed=result.failed, cf_unavailable=result.unavailable,
                   cf_not_applicable=result.not_applicable,
                   cf_accepted=result.accepted if result.determined else None)
        # 3. Alignment
        diff = _item_difference_map(run_dir, record, query, counterfactual, config.map_kind)
        box = _chest_box(record, shape)
        row["mass_outside_chest_box"] = mass_outside_box(diff, box)
        if record.get("shortcut_mask_png"):
            marker = read_mask_png(run_dir / record["shortcut_mask_png"], shape)
            row["marker/largest_component_overlaps"] = largest_component_overlaps(record.get("frame"), marker)
            share = top_mass_share(diff, marker)
            row["marker/top5_mass_share"] = share
            row["marker/top5_mass_on_marker"] = share is not None and share >= MARKER_MASS_SHARE
        smoothed_file = record.get("positive_npy")
        smoothed = (np.load(run_dir / smoothed_file, allow_pickle=False).astype(np.float64)
                    if smoothed_file and (run_dir / smoothed_file).is_file() else None)
        mask = None
        if record.get("mask_png"):
            mask = read_mask_png(run_dir / record["mask_png"], shape)
        elif annotations is not None:
            mask = annotations.mask(str(record["image_id"]), record["finding"], shape)
        if mask is not None:
            row.update(alignment.alignment_summary(diff, mask, box, config.percentiles, config.iou_thresholds,
                                                   config.boundary_radius))
            if smoothed is not None and smoothed.shape == diff.shape and config.map_kind == "positive":
                row["full/auc_smoothed"] = alignment.pixel_roc_auc(smoothed, mask, box)
            for kind in ("full", "boundary", "dilated_boundary"):
                curve_inputs[kind].append((diff, alignment.annotation_target(mask, kind, config.boundary_radius), box))
        heatmap = annotations.heatmap(str(record["image_id"]), record["finding"], shape) if annotations else None
        if heatmap is not None:
            row["heatmap/ncc"] = alignment.ncc(diff, heatmap, box)
            if mask is not None:
                curve_inputs["heatmap"].append((heatmap, mask, box))
        rows.append(row)

    # 4. Write per-item metrics and aggregates
    _atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(to_json_safe(r)) + "\n" for r in rows))
    verified = [r for r in rows if r["verified"]]
    if scorer_provenance is None:
        scorer_provenance = {"lpips": describe_scorer(lpips, "lpips"),
                             "clip_encoder": describe_scorer(encoder, "clip_encoder"),
                             "cpg_classifier": describe_scorer(classifier, "cpg_classifier"),
                             "thresholds": {**vars(config.thresholds), "source": {"name": "CFThresholds as given"}},
                             "not_applicable": list(config.not_applicable)}
    summary = {"all": _aggregate(rows), "verified": _aggregate(verified),
               "settings": {"map_kind": config.map_kind, "boundary_radius": config.boundary_radius,
                            "thresholds": vars(config.thresholds), "not_applicable": list(config.not_applicable),
                            "lpips": lpips is not None,
                            "encoder": type(encoder).__name__ if encoder is not None else None,
                            "classifier": type(classifier).__name__ if classifier is not None else None,
                            "alignment_map": f"{config.map_kind} part of I - CF, raw (seed 000), inside the chest box",
                            "marker_rule": (f"largest frame component overlaps the marker; and >= {MARKER_MASS_SHARE:g} "
                                            f"of the map's top-{MARKER_TOP_PERCENT:g} % mass on the marker")},
               "provenance": {**environment(), "scorers": scorer_provenance}}
    curves = _pooled_curves(curve_inputs, config)
    summary["curves"] = curves
    if config.draw_figures:
        summary["figures"] = _draw(run_dir / "figures", rows, curves, config)
    summary_path = run_dir / "summary.json"
    existing = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    existing["metrics"] = to_json_safe(summary)
    _atomic_write(summary_path, json.dumps(existing, indent=2))
    return existing["metrics"]


def _pooled_curves(curve_inputs: dict[str, list], config: EvaluationConfig) -> dict:
    curves: dict = {}
    labels = {"full": "CF map vs mask", "boundary": "CF map vs boundary",
              "dilated_boundary": "CF map vs dilated boundary", "heatmap": "eye tracking vs mask"}
    for kind, items in curve_inputs.items():
        maps, masks, boxes = zip(*items, strict=True)
        percentiles, rates = alignment.hit_rate_curve(maps, masks, config.percentiles, boxes)
        fpr, tpr, auc = alignment.pooled_roc_curve(maps, masks, boxes)
        thresholds, ious = alignment.mean_threshold_iou_curve(maps, masks, config.iou_thresholds, boxes)
        # ROC points thinned to keep summary.json small
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 101)).astype(int))
        curves[kind] = {
            "label": labels[kind],
            "hit_rate": {"percentiles": percentiles.tolist(), "rates": rates.tolist()},
            "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "auc": auc},
            "threshold_iou": {"thresholds": thresholds.tolist(), "ious": ious.tolist(),
                              "auc_iou": alignment.area_under_iou_curve(thresholds, ious)},
        }
    return curves


def _draw(figure_dir: Path, rows: list[dict], curves: dict, config: EvaluationConfig) -> dict[str, str]:
    drawn: dict[str, str] = {}
    cpg = [r["cpg"] for r in rows if "cpg" in r]
    if cpg:
        drawn["cpg"] = str(figures.plot_cpg_distribution(cpg, figure_dir / "cpg.png", config.thresholds.cpg).name)
    if curves:
        by_label = {c["label"]: c for c in curves.values()}
        drawn["hit_rate"] = figures.plot_hit_rate_curves(
            {k: (c["hit_rate"]["percentiles"], c["hit_rate"]["rates"]) for k, c in by_label.items()},
            figure_dir / "hit_rate.png").name
        drawn["roc"] = figures.plot_roc_curves(
            {k: (c["roc"]["fpr"], c["roc"]["tpr"], c["roc"]["auc"]) for k, c in by_label.items()},
            figure_dir / "roc.png").name
        drawn["threshold_iou"] = figures.plot_threshold_iou_curves(
            {k: (c["threshold_iou"]["thresholds"], c["threshold_iou"]["ious"], c["threshold_iou"]["auc_iou"])
             for k, c in by_label.items()}, figure_dir / "threshold_iou.png").name
    return {k: f"figures/{v}" for k, v in drawn.items()}
