"""Alignment of explanation maps with annotations or with each other (SPEC section 2, seed 000).

Inputs: maps are (H, W) float arrays (any range; difference maps, eye-tracking heatmaps, relevance
maps), masks are (H, W) bool arrays (segmentations, boxes, ellipses rasterised by `annotations`).
Torch tensors are accepted too. NaN inputs and mismatched shapes raise `ValueError`.

Every metric takes `chest_box=(x0, y0, x1, y1)` (pixel corners, x1 / y1 exclusive) to restrict the
comparison to the chest, as seed 000 does with REFLACX's chest boxes (both inputs are cropped;
`chest_box` holds the box helpers).

Edge cases (defined here, tested in tests/test_explain_alignment.py):
- constant map: carries no ranking. NCC 0.0, no top-k pixels (hit 0.0), pixel AUC 0.5, it selects
  no pixel at any IoU threshold (IoU 0.0).
- empty mask: nothing to align with. Hit, AUC and IoU are NaN (aggregates skip NaN); NCC against an
  all-false mask is 0.0 (constant).
- all-positive mask: AUC NaN (one class only); hit 1.0 for any non-constant map; NCC 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cyclex.explain.chest_box import crop_to_box
from cyclex.image_checks import as_gray_array

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_IOU_THRESHOLDS",
    "as_mask",
    "mask_boundary",
    "dilated_boundary",
    "annotation_target",
    "ncc",
    "top_k_pixels",
    "top_k_hit",
    "hit_rate_curve",
    "pixel_roc_auc",
    "pooled_roc_curve",
    "threshold_iou_curve",
    "area_under_iou_curve",
    "mean_threshold_iou_curve",
    "alignment_summary",
]

# Top-k percentiles for the hit-rate curve (share of the map's pixels kept, in percent).
DEFAULT_PERCENTILES = (1, 2, 5, 10, 15, 20, 30, 40, 50)
# Intensity thresholds on the min-max normalised map for the threshold-IoU curve.
DEFAULT_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.0, 1.0, 21), 4))


def as_mask(value, name: str = "mask") -> np.ndarray:
    """(H, W) bool array; non-bool input must hold only 0 / 1."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}")
    if array.dtype != bool:
        as_float = array.astype(np.float64)
        if not np.isfinite(as_float).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        if not np.isin(as_float, (0.0, 1.0)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1), got values in [{as_float.min()}, {as_float.max()}]")
        array = as_float > 0.5
    return array


def _same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")


def mask_boundary(mask) -> np.ndarray:
    """One-pixel inner contour of a mask (pixels of the mask touching the background), (H, W) bool.

    Pixels on the image border count as boundary when the mask reaches the border.
    """
    from skimage.segmentation import find_boundaries

    mask = as_mask(mask)
    padded = np.pad(mask, 1, constant_values=False)
    return find_boundaries(padded, mode="inner")[1:-1, 1:-1] & mask


def dilated_boundary(mask, radius: int = 3) -> np.ndarray:
    """The one-pixel contour dilated by a disk of `radius` pixels (seed 000's suggested tolerance)."""
    from skimage.morphology import dilation, disk

    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    boundary = mask_boundary(mask)
    return dilation(boundary, disk(radius)) if radius else boundary


def annotation_target(mask, kind: str = "full", radius: int = 3) -> np.ndarray:
    """The region maps are compared to: 'full' mask, its 'boundary', or the 'dilated_boundary'."""
    if kind == "full":
        return as_mask(mask)
    if kind == "boundary":
        return mask_boundary(mask)
    if kind == "dilated_boundary":
        return dilated_boundary(mask, radius)
    raise ValueError(f"kind must be 'full', 'boundary' or 'dilated_boundary', got {kind!r}")


def _prepare(map_, mask, chest_box, names=("map", "mask")) -> tuple[np.ndarray, np.ndarray]:
    m = as_gray_array(map_, name=names[0], dtype=np.float64)
    k = as_mask(mask, names[1])
    _same_shape(m, k, names)
    return crop_to_box(m, chest_box), crop_to_box(k, chest_box)


def ncc(map_a, map_b, chest_box: Sequence[int] | None = None) -> float:
    """Normalised cross-correlation of two equally shaped maps (Pearson r of their pixels), in [-1, 1].

    NCC = mean((a - mean a)(b - mean b)) / (std a * std b). Masks are accepted as 0/1 maps.
    Defined as 0.0 when either map is constant (no variation to correlate).
    """
    a = as_gray_array(map_a, name="map_a", dtype=np.float64)
    b = as_gray_array(map_b, name="map_b", dtype=np.float64)
    _same_shape(a, b, ("map_a", "map_b"))
    a, b = crop_to_box(a, chest_box).ravel(), crop_to_box(b, chest_box).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denominator == 0.0:
        return 0.0
    return float(np.clip((a * b).sum() / denominator, -1.0, 1.0))


def top_k_pixels(map_, k_percent: float) -> np.ndarray:
    """(H, W) bool: pixels at or above the map's (100 - k)-th percentile; none for a constant map."""
    m = as_gray_array(map_, name="map", dtype=np.float64)
    if not 0 < k_percent <= 100:
        raise ValueError(f"k_percent must be in (0, 100], got {k_percent}")
    if m.max() == m.min():
        return np.zeros(m.shape, dtype=bool)
    return m >= np.percentile(m, 100.0 - k_percent)


def top_k_hit(map_, mask, k_percent: float, chest_box: Sequence[int] | None = None) -> float:
    """Per-sample hit (seed 000, after Saporta et al. 2022): 1.0 if any of the top-k-percentile pixels
    of the map falls inside the annotation, else 0.0; NaN for an empty annotation.

    **Choice**: "fall within" is read as "at least one of them", so the curve rises as k relaxes, as
    in seed 000 Fig. 3.
    """
    m, k = _prepare(map_, mask, chest_box)
    if not k.any():
        return math.nan
    return float((top_k_pixels(m, k_percent) & k).any())


def hit_rate_curve(maps: Sequence, masks: Sequence, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                   chest_boxes: Sequence[Sequence[int] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hit Rate = share of samples that hit, for each top-k percentile -> (percentiles, rates in [0, 1]).

    Samples with an empty annotation are left out (their hit is NaN); all left out -> NaN rates.
    """
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps and {len(masks)} masks")
    boxes = list(chest_boxes) if chest_boxes is not None else [None] * len(maps)
    if len(boxes) != len(maps):
        raise ValueError(f"got {len(boxes)} chest boxes for {len(maps)} maps")
    hits = np.array([[top_k_hit(m, k, p, b) for p in percentiles] for m, k, b in zip(maps, masks, boxes, strict=True)],
                    dtype=np.float64).reshape(len(maps), len(percentiles))
    valid = ~np.isnan(hits[:, 0]) if len(maps) else np.zeros(0, dtype=bool)
    rates = hits[valid].mean(axis=0) if valid.any() else np.full(len(percentiles), np.nan)
    return np.asarray(percentiles, dtype=np.float64), rates


def pixel_roc_auc(map_, mask, chest_box: Sequence[int] | None = None) -> float:
    """Pixel-wise ROC-AUC: map values score pixels, the mask labels them (scikit-learn).

    NaN when the (cropped) mask is empty or all-positive (AUC undefined); 0.5 for a constant map.
    """
    from sklearn.metrics import roc_auc_score

    m, k = _prepare(map_, mask, chest_box)
    if k.all() or not k.any():
        return math.nan
    return float(roc_auc_score(k.ravel(), m.ravel()))


def pooled_roc_curve(maps: Sequence, masks: Sequence, chest_boxes: Sequence | None = None
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC over the pixels of all samples pooled (seed 000 Fig. 4) -> (fpr, tpr, auc).

    Each map is min-max normalised first so samples share one score scale.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    boxes = list(chest_boxes) if chest_boxes is not None else [None] * len(maps)
    if not (len(maps) == len(masks) == len(boxes)):
        raise ValueError(f"got {len(maps)} maps, {len(masks)} masks and {len(boxes)} chest boxes")
    scores, labels = [], []
    for m, k, b in zip(maps, masks, boxes, strict=True):
        m, k = _prepare(m, k, b)
        scores.append(_normalise(m).ravel())
        labels.append(k.ravel())
    if not scores:
        raise ValueError("pooled_roc_curve needs at least one map")
    y, s = np.concatenate(labels), np.concatenate(scores)
    if y.all() or not y.any():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), math.nan
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr, float(roc_auc_score(y, s))


def _normalise(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all zeros."""
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def threshold_iou_curve(map_, mask, thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                        chest_box: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """IoU(normalised map >= t, mask) for each threshold t in [0, 1] -> (thresholds, ious).

    The map is min-max normalised within the (cropped) region. A constant map selects no pixel (IoU 0);
    an empty mask gives NaN everywhere.
    """
    m, k = _prepare(map_, mask, chest_box)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or len(t) < 2 or np.any(np.diff(t) <= 0) or t.min() < 0 or t.max() > 1:
        raise ValueError(f"thresholds must be an increasing sequence of >= 2 values in [0, 1], got {thresholds!r}")
    if not k.any():
        return t, np.full(len(t), np.nan)
    if m.max() == m.min():
        return t, np.zeros(len(t))
    normalised = _normalise(m)
    ious = np.empty(len(t))
    for i, threshold in enumerate(t):
        selected = normalised >= threshold
        ious[i] = (selected & k).sum() / (selected | k).sum()
    return t, ious


def area_under_iou_curve(thresholds, ious) -> float:
    """AUC-IoU: trapezoidal area under the threshold-IoU curve divided by the threshold span, in [0, 1]."""
    t = np.asarray(thresholds, dtype=np.float64)
    v = np.asarray(ious, dtype=np.float64)
    if t.shape != v.shape or t.ndim != 1 or len(t) < 2:
        raise ValueError(f"thresholds and ious must be 1-D of equal length >= 2, got {t.shape} and {v.shape}")
    if np.isnan(v).any():
        return math.nan
    return float(np.trapezoid(v, t) / (t[-1] - t[0]))


def mean_threshold_iou_curve(maps: Sequence, masks: Sequence, thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                             chest_boxes: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean over samples (NaN samples skipped) of the threshold-IoU curves -> (thresholds, mean ious)."""
    boxes = list(chest_boxes) if chest_boxes is not None else [None] * len(maps)
    if not (len(maps) == len(masks) == len(boxes)):
        raise ValueError(f"got {len(maps)} maps, {len(masks)} masks and {len(boxes)} chest boxes")
    curves = [threshold_iou_curve(m, k, thresholds, b)[1] for m, k, b in zip(maps, masks, boxes, strict=True)]
    curves = [c for c in curves if not np.isnan(c).any()]
    t = np.asarray(thresholds, dtype=np.float64)
    return t, (np.mean(curves, axis=0) if curves else np.full(len(t), np.nan))


def alignment_summary(map_, mask, chest_box: Sequence[int] | None = None,
                      percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                      thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                      boundary_radius: int = 3) -> dict[str, float]:
    """Every per-sample alignment number of one map against one mask, for the full mask, its one-pixel
    boundary and its dilated boundary: keys like `full/ncc`, `full/auc`, `full/auc_iou`,
    `boundary/hit@5` (NaN where undefined)."""
    m = as_gray_array(map_, name="map", dtype=np.float64)
    out: dict[str, float] = {}
    for kind in ("full", "boundary", "dilated_boundary"):
        target = annotation_target(mask, kind, boundary_radius)
        _same_shape(m, target, ("map", "mask"))
        out[f"{kind}/ncc"] = ncc(m, target, chest_box)
        out[f"{kind}/auc"] = pixel_roc_auc(m, target, chest_box)
        t, ious = threshold_iou_curve(m, target, thresholds, chest_box)
        out[f"{kind}/auc_iou"] = area_under_iou_curve(t, ious)
        for p in percentiles:
            out[f"{kind}/hit@{p:g}"] = top_k_hit(m, target, p, chest_box)
    return out
