"""Audit of several report generators on the same queries: rates, frame agreement, shortcut flags.

`audit_runs({"clean": RUN_A, "shortcut": RUN_B})` reads finished run folders (`run_explainer`'s
results.jsonl and items/) and computes, per finding:

- the Cyclic Rate of each generator with its 95 % Wilson score interval, and the difference of each
  later generator against the first with Newcombe's hybrid score interval (method 10 of Newcombe
  1998; unpaired: each generator removes a finding only where its own report had it, so the items
  differ);
- frame agreement between each pair of generators on the same image and finding: NCC of the
  positive difference maps (`cyclex.explain.alignment.ncc`) and IoU of the feature-frame masks;
- the shortcut test (`shortcut_evidence`): for each generator and finding, how much of the positive
  map lies outside the chest box and outside the finding's anatomical prior
  (`cyclex.explain.anatomical_priors`), and how many images put their evidence peak at one common
  place where the finding cannot be.

The shortcut statistic S = k / n: of the n items of a (generator, finding), k have their map peak
outside the finding's prior *and* within `SHORTCUT_RADIUS` of the median of those outside peaks. The
flag is raised when the 95 % Wilson lower bound of S exceeds `SHORTCUT_THRESHOLD` (0.25) and
n >= `SHORTCUT_MIN_ITEMS`; both numbers were fixed before any audit was run (not tuned on the reported
seeds): "more than a quarter of the images, with 95 % confidence, draw this finding from one place
where it cannot lie". Pure computation: arrays and dicts, no HTML, no PNG (see `cyclex.cycle.audit_report`).

Cyclic engine layer: imports `cyclex.explain` and `cyclex.cycle.run_folder`, never `cyclex.demo`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from cyclex.cycle.run_folder import read_results
from cyclex.explain.alignment import ncc
from cyclex.explain.anatomical_priors import anatomical_prior
from cyclex.explain.frames import estimate_chest_box, mask_iou
from cyclex.findings import ABNORMALITIES

__all__ = [
    "SHORTCUT_MIN_ITEMS",
    "SHORTCUT_RADIUS",
    "SHORTCUT_THRESHOLD",
    "TOP_MASS_PERCENT",
    "compute_audit",
    "frame_agreement",
    "item_evidence",
    "newcombe_difference_interval",
    "shortcut_evidence",
    "wilson_interval",
]

# Fixed a priori (issue 21), never chosen on reported seeds:
SHORTCUT_THRESHOLD = 0.25  # the Wilson lower bound of S must exceed this share of images
SHORTCUT_MIN_ITEMS = 4  # fewer items than this cannot raise a flag
SHORTCUT_RADIUS = 0.125  # "one common place": within 1/8 of the image side of the outside peaks' median
TOP_MASS_PERCENT = 5.0  # the brightest 5 % of map pixels: where the evidence is
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95 % Wilson score interval of a rate k / n; None when n == 0."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k must lie in [0, n], got k={k}, n={n}")
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float] | None:
    """95 % interval of p2 - p1 (two independent rates) by Newcombe's hybrid score method."""
    first, second = wilson_interval(k1, n1), wilson_interval(k2, n2)
    if first is None or second is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = first, second
    difference = p2 - p1
    lower = difference - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    upper = difference + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return max(-1.0, lower), min(1.0, upper)


def _rate_entry(k: int, n: int) -> dict[str, Any]:
    interval = wilson_interval(k, n)
    return {"n": n, "n_verified": k, "cyclic_rate": k / n if n else None,
            "ci95": list(interval) if interval else None}


# -- per item ------------------------------------------------------------------------------------------
def _load_map(root: Path, line: Mapping[str, Any]) -> np.ndarray:
    path = root / line["files"]["positive_npy"]
    if not path.is_file():
        raise FileNotFoundError(f"{root}: item {line['image_id']!r} / {line['finding']}: {path} does not exist")
    array = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    return np.squeeze(array)


def _load_gray(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"{path} is missing or not an image")
    return image.astype(np.float64) / 255.0


def _chest_box(root: Path, line: Mapping[str, Any], given: Mapping[str, Sequence[int]] | None) -> tuple[list[int], str]:
    box = line.get("chest_box")
    if box:
        return [int(v) for v in box], "result line"
    if given and given.get(str(line["image_id"])):
        return [int(v) for v in given[str(line["image_id"])]], "image records"
    # the demo frames the whole image (its marker lies outside the chest), so its lines carry no box
    return [int(v) for v in estimate_chest_box(_load_gray(root / line["query_png"]))], "estimated (Otsu)"


def item_evidence(positive: np.ndarray, finding: str, chest_box: Sequence[int]) -> dict[str, Any]:
    """Where one item's evidence lies: masses outside the chest box and the prior, its peak.

    positive: (H, W) non-negative map (the run's positive.npy); chest_box: (x0, y0, x1, y1).
    Returns outside_chest_mass / outside_prior_mass (shares of the map's total mass in [0, 1], None
    for an empty map), top_outside_prior (share of the top-5 % pixels outside the prior), the peak
    (x, y) of the map smoothed a little further (so one hot pixel does not decide) and whether the
    peak lies outside the prior.
    """
    import cv2

    positive = np.clip(np.asarray(positive, dtype=np.float64), 0, None)
    if positive.ndim != 2:
        raise ValueError(f"item_evidence: positive must be an (H, W) map, got shape {positive.shape}")
    h, w = positive.shape
    x0, y0, x1, y1 = (int(v) for v in chest_box)
    chest = np.zeros((h, w), dtype=bool)
    chest[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = True
    prior = anatomical_prior(finding, (h, w), chest_box)
    total = float(positive.sum())
    smooth = cv2.GaussianBlur(positive, (0, 0), 2.0)
    y, x = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    top = positive >= np.percentile(positive, 100 - TOP_MASS_PERCENT)
    return {
        "outside_chest_mass": float(positive[~chest].sum() / total) if total > 0 else None,
        "outside_prior_mass": float(positive[~prior].sum() / total) if total > 0 else None,
        "top_outside_prior": float((top & ~prior).sum() / max(int(top.sum()), 1)) if total > 0 else None,
        "peak": [int(x), int(y)],
        "peak_outside_prior": bool(total > 0 and not prior[y, x]),
        "shape": [h, w],
    }


def shortcut_evidence(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shortcut test over one (generator, finding)'s items (each an `item_evidence` dict).

    S = k / n: items whose peak lies outside the prior and within `SHORTCUT_RADIUS` x the image side
    of the median of the outside peaks. Flagged when n >= SHORTCUT_MIN_ITEMS and the Wilson lower
    bound of S > SHORTCUT_THRESHOLD. suspected_box: (x0, y0, x1, y1) around those peaks (padded by the
    radius), None when no peak lies outside the prior.
    """
    n = len(items)
    outside = [it for it in items if it["peak_outside_prior"]]
    k, centre, box = 0, None, None
    if outside:
        side = max(items[0]["shape"])
        radius = SHORTCUT_RADIUS * side
        centre = np.median(np.array([it["peak"] for it in outside], dtype=np.float64), axis=0)
        near = [it for it in outside if math.dist(it["peak"], centre) <= radius]
        k = len(near)
        if near:
            peaks = np.array([it["peak"] for it in near])
            h, w = items[0]["shape"]
            pad = int(math.ceil(radius / 2))
            box = [max(0, int(peaks[:, 0].min()) - pad), max(0, int(peaks[:, 1].min()) - pad),
                   min(w, int(peaks[:, 0].max()) + pad + 1), min(h, int(peaks[:, 1].max()) + pad + 1)]
    interval = wilson_interval(k, n)
    lower = interval[0] if interval else None
    flagged = bool(n >= SHORTCUT_MIN_ITEMS and lower is not None and lower > SHORTCUT_THRESHOLD)

    def mean(key: str) -> float | None:
        values = [it[key] for it in items if it[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "n_items": n,
        "n_peak_outside_prior": len(outside),
        "n_consistent_outside": k,
        "statistic": k / n if n else None,
        "statistic_ci95": list(interval) if interval else None,
        "threshold": SHORTCUT_THRESHOLD,
        "min_items": SHORTCUT_MIN_ITEMS,
        "flagged": flagged,
        "common_location": [float(v) for v in centre] if centre is not None else None,
        "suspected_box": box,
        "mean_outside_chest_mass": mean("outside_chest_mass"),
        "mean_outside_prior_mass": mean("outside_prior_mass"),
        "mean_top_outside_prior": mean("top_outside_prior"),
        "rule": (f"flag when n >= {SHORTCUT_MIN_ITEMS} and the 95 % Wilson lower bound of S = k / n exceeds "
                 f"{SHORTCUT_THRESHOLD:g}; k: items whose map peak lies outside the finding's anatomical prior "
                 f"and within {SHORTCUT_RADIUS:g} x the image side of the median outside peak"),
    }


def frame_agreement(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Mean NCC of the positive maps and mean IoU of the frame masks over (map_a, map_b, mask_a, mask_b)."""
    nccs = [ncc(a, b) for a, b, _, _ in pairs]
    ious = [mask_iou(ma, mb) for _, _, ma, mb in pairs]
    return {"n_pairs": len(pairs), "mean_ncc": float(np.mean(nccs)) if nccs else None,
            "mean_iou": float(np.mean(ious)) if ious else None}


# -- whole audit ---------------------------------------------------------------------------------------
def _finding_order(finding: str) -> tuple[int, str]:
    return (ABNORMALITIES.index(finding), finding) if finding in ABNORMALITIES else (len(ABNORMALITIES), finding)


def compute_audit(runs: Mapping[str, str | os.PathLike],
                  chest_boxes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """The audit of two or more finished run folders on the same images (a JSON-ready dict).

    runs: generator name -> run folder, the first being the reference of the rate differences.
    chest_boxes: image id -> (x0, y0, x1, y1), for lines that carry none (the demo's: it frames the
    whole image); items without either get an Otsu estimate (`estimate_chest_box`), which on
    phantoms often spans the whole film and so makes the outside-chest mass read low.
    Keys: generators ({name: {run, generator, n, cyclic_rate, ci95}}), findings (per finding: rates
    per generator, differences against the first, pairwise frame agreement, shortcut tests per
    generator), shortcut_flags (the flagged (generator, finding) pairs), items (per item evidence).
    """
    if len(runs) < 2:
        raise ValueError(f"an audit needs at least two run folders, got {len(runs)}: {list(runs)}")
    names = list(runs)
    roots = {name: Path(path) for name, path in runs.items()}
    lines = {name: read_results(root) for name, root in roots.items()}
    images = {name: {str(ln["image_id"]) for ln in lines[name]} for name in names}
    shared_images = set.intersection(*images.values())
    if not shared_images:
        raise ValueError(f"the runs {names} share no image: an audit compares generators on the same queries")

    evidence: dict[str, dict[tuple[str, str], dict[str, Any]]] = {name: {} for name in names}
    for name in names:
        for line in lines[name]:
            positive = _load_map(roots[name], line)
            box, box_source = _chest_box(roots[name], line, chest_boxes)
            found = item_evidence(positive, line["finding"], box)
            found.update({"chest_box": box, "chest_box_source": box_source, "verified": bool(line["verified"]),
                          "shortcut_marker": bool(line.get("shortcut"))})
            evidence[name][(str(line["image_id"]), line["finding"])] = found

    all_findings = sorted({ln["finding"] for name in names for ln in lines[name]}, key=_finding_order)
    findings: dict[str, Any] = {}
    for finding in all_findings:
        by_generator = {name: [ln for ln in lines[name] if ln["finding"] == finding] for name in names}
        rates = {name: _rate_entry(sum(bool(ln["verified"]) for ln in found), len(found))
                 for name, found in by_generator.items()}
        reference = names[0]
        differences = {}
        for name in names[1:]:
            a, b = rates[reference], rates[name]
            interval = newcombe_difference_interval(a["n_verified"], a["n"], b["n_verified"], b["n"])
            differences[f"{name} - {reference}"] = {
                "difference": (b["cyclic_rate"] - a["cyclic_rate"]) if interval else None,
                "ci95": list(interval) if interval else None}
        agreement = {}
        for first, second in combinations(names, 2):
            keyed = {str(ln["image_id"]): ln for ln in by_generator[second]}
            pairs = []
            for line in by_generator[first]:
                other = keyed.get(str(line["image_id"]))
                if other is None:
                    continue
                pairs.append((_load_map(roots[first], line), _load_map(roots[second], other),
                              _load_gray(roots[first] / line["frame_mask_png"]) > 0.5,
                              _load_gray(roots[second] / other["frame_mask_png"]) > 0.5))
            agreement[f"{first} vs {second}"] = frame_agreement(pairs)
        shortcut = {name: shortcut_evidence([evidence[name][(str(ln["image_id"]), finding)] for ln in found])
                    for name, found in by_generator.items()}
        findings[finding] = {"rates": rates, "differences": differences, "frame_agreement": agreement,
                             "shortcut": shortcut}

    generators = {}
    for name in names:
        k = sum(bool(ln["verified"]) for ln in lines[name])
        config = roots[name] / "run_config.json"
        generator = json.loads(config.read_text()).get("generator") if config.is_file() else None
        generators[name] = {"run": str(roots[name]), "generator": generator, **_rate_entry(k, len(lines[name]))}
    flags = [{"generator": name, "finding": finding, **{k: v for k, v in entry["shortcut"][name].items() if k != "rule"}}
             for finding, entry in findings.items() for name in names if entry["shortcut"][name]["flagged"]]
    items = [{"generator": name, "image_id": image_id, "finding": finding, **found}
             for name in names for (image_id, finding), found in evidence[name].items()]
    return {
        "names": names,
        "n_shared_images": len(shared_images),
        "generators": generators,
        "findings": findings,
        "shortcut_flags": flags,
        "shortcut_rule": shortcut_evidence([])["rule"],
        "items": items,
    }
