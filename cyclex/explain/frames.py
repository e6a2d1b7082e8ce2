"""Feature identification frames and difference maps (SPEC section 1, seed 003; seed 000).

Pure computation: `difference_maps`, `feature_frame`, `choose_threshold`,
`calibrate_frame_thresholds` and `estimate_chest_box` return arrays / dataclasses. Drawing them
(colour overlays, contours) is `cyclex.explain.overlays` (STYLE.md point 14).

Images here are single X-rays as float arrays (H, W) in [0, 1]; tensors (1, H, W) / (1, 1, H, W)
are accepted and squeezed.

The frame, seed 003: D = |I - CF| on a 0-255 scale -> Gaussian blur 5x5 -> threshold L ->
connected components -> keep the K = 5 largest by area -> mask + contours. The paper picks L per
finding from 95 +- 10 ("best value per finding") without saying how; cyclex offers two documented
criteria (choice):
- "stable" (default, needs no labels): among the candidates, the L whose frame changes least when L
  moves to its neighbours (highest mean IoU with the neighbouring candidates' frames), ties broken
  towards the centre value 95;
- calibration: `calibrate_frame_thresholds` picks, per finding, the L with the highest mean IoU
  against ground-truth masks on a calibration set (phantoms carry such masks); pass the resulting dict.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from cyclex.explain.chest_box import ChestBox, box_mask
from cyclex.image_checks import as_gray_array

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 95  # L on the 0-255 scale (seed 003)
DEFAULT_THRESHOLD_CANDIDATES = (85, 90, 95, 100, 105)  # 95 +- 10
DEFAULT_K = 5
DEFAULT_BLUR = 5

def _check_pair(query, counterfactual) -> tuple[np.ndarray, np.ndarray]:
    q = as_gray_array(query, name="query")
    c = as_gray_array(counterfactual, name="counterfactual")
    if q.shape != c.shape:
        raise ValueError(f"query {q.shape} and counterfactual {c.shape} must have the same shape")
    return q, c


def check_kernel(name: str, size: int) -> int:
    """A Gaussian kernel side as OpenCV takes it (odd, >= 1; 1 = no blur), or a ValueError naming `name`."""
    if int(size) != size or size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd kernel size >= 1, got {size}")
    return int(size)


def difference_maps(query, counterfactual, chest_box: Sequence[int] | None = None, positive_blur: int = 1):
    """(abs, signed, positive) float32 (H, W) maps on the [0, 1] scale.

    abs = |I - CF| (seed 003's D before scaling); signed = I - CF; positive = max(I - CF, 0), the
    seed 000 alignment map (darkening where the heart retracts). With a chest box, all three are
    zero outside it (seed 000: removes text-marker artefacts).
    positive_blur: odd Gaussian kernel applied to the positive map (1: none, seed 000's raw map). The
    query's sensor noise is in I - CF wherever the counterfactual does not copy it pixel for pixel;
    the frame's 5 x 5 blur (seed 003) averages it out of the map as it does out of the frame.
    """
    check_kernel("positive_blur", positive_blur)
    q, c = _check_pair(query, counterfactual)
    signed = q - c
    inside = box_mask(signed.shape, chest_box) if chest_box is not None else None
    if inside is not None:
        signed = np.where(inside, signed, 0.0).astype(np.float32)
    positive = np.maximum(signed, 0.0)
    if positive_blur > 1:
        positive = cv2.GaussianBlur(positive, (positive_blur, positive_blur), 0)
        if inside is not None:
            positive = np.where(inside, positive, 0.0).astype(np.float32)
    return np.abs(signed), signed, positive


@dataclass(frozen=True)
class FrameComponent:
    """One kept connected component: area in pixels, bbox (x, y, w, h), contour (N, 2) int (x, y)."""

    area: int
    bbox: tuple[int, int, int, int]
    contour: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"area": self.area, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class FeatureFrame:
    """mask (H, W) bool: union of the K largest components; components largest first."""

    mask: np.ndarray = field(repr=False)
    components: list[FrameComponent]
    threshold: float

    @property
    def contours(self) -> list[np.ndarray]:
        return [c.contour for c in self.components]

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "area": self.area, "components": [c.to_dict() for c in self.components]}


def _blurred_difference(query, counterfactual, blur: int, chest_box, normalize: bool = False) -> np.ndarray:
    abs_map, _, _ = difference_maps(query, counterfactual, chest_box=chest_box)
    check_kernel("blur", blur)
    scaled = abs_map * 255.0  # seed 003 thresholds on the 0-255 scale
    if normalize and scaled.max() > 0:
        # (choice) stretch D so its maximum is 255: L becomes a share of the strongest change
        scaled = scaled * (255.0 / float(scaled.max()))
    return cv2.GaussianBlur(scaled, (blur, blur), 0) if blur > 1 else scaled


def frame_from_difference(blurred: np.ndarray, threshold: float, k: int = DEFAULT_K) -> FeatureFrame:
    """Threshold a blurred 0-255 difference map at L (strictly greater) and keep the k largest components."""
    if k < 1:
        raise ValueError(f"k (components kept) must be >= 1, got {k}")
    binary = (blurred > float(threshold)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    # label 0 is the background; order by area, then by label for a deterministic tie-break
    order = sorted(range(1, count), key=lambda i: (-int(stats[i, cv2.CC_STAT_AREA]), i))[:k]
    mask = np.zeros(binary.shape, dtype=bool)
    components = []
    for label in order:
        region = labels == label
        mask |= region
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=len).reshape(-1, 2)
        x, y, w, h = (int(stats[label, j]) for j in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
        components.append(FrameComponent(area=int(stats[label, cv2.CC_STAT_AREA]), bbox=(x, y, w, h), contour=contour))
    return FeatureFrame(mask=mask, components=components, threshold=float(threshold))


def feature_frame(
    query, counterfactual, threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K, blur: int = DEFAULT_BLUR,
    chest_box: Sequence[int] | None = None, normalize: bool = False,
) -> FeatureFrame:
    """Seed 003's feature identification frame of one (query, counterfactual) pair.

    query, counterfactual: (H, W) in [0, 1]. threshold: L on 0-255. k: components kept. blur: odd
    Gaussian kernel side. chest_box: (x0, y0, x1, y1) outside which D is zeroed, or None.
    normalize: stretch D to a maximum of 255 before thresholding (choice; default off, as the paper).
    """
    return frame_from_difference(_blurred_difference(query, counterfactual, blur, chest_box, normalize), threshold, k)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree perfectly (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def choose_threshold(
    query, counterfactual, candidates: Iterable[float] = DEFAULT_THRESHOLD_CANDIDATES, k: int = DEFAULT_K,
    blur: int = DEFAULT_BLUR, chest_box: Sequence[int] | None = None, centre: float = DEFAULT_THRESHOLD,
    normalize: bool = False,
) -> float:
    """The "stable" criterion: L whose frame has the highest mean IoU with its neighbours' frames.

    Candidates are sorted; each is scored against the frames at the adjacent candidates. Ties go to
    the candidate nearest `centre` (95).
    """
    levels = sorted(float(c) for c in candidates)
    if not levels:
        raise ValueError("candidates must hold at least one threshold")
    if len(levels) == 1:
        return levels[0]
    blurred = _blurred_difference(query, counterfactual, blur, chest_box, normalize)
    masks = [frame_from_difference(blurred, level, k).mask for level in levels]
    scores = []
    for i in range(len(levels)):
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(levels)]
        scores.append(np.mean([mask_iou(masks[i], masks[j]) for j in neighbours]))
    best = max(range(len(levels)), key=lambda i: (round(scores[i], 9), -abs(levels[i] - centre)))
    return levels[best]


def calibrate_frame_thresholds(
    items: Iterable[tuple[str, object, object, np.ndarray]],
    candidates: Iterable[float] = DEFAULT_THRESHOLD_CANDIDATES, k: int = DEFAULT_K, blur: int = DEFAULT_BLUR,
    centre: float = DEFAULT_THRESHOLD, normalize: bool = False,
) -> dict[str, float]:
    """Per finding, the L with the highest mean IoU between frames and true masks.

    items: (finding, query (H, W), counterfactual (H, W), true mask (H, W) bool) on a calibration set.
    Returns {finding: L}; ties go to the candidate nearest `centre`.
    """
    levels = sorted(float(c) for c in candidates)
    scores: dict[str, list[list[float]]] = {}
    for finding, query, counterfactual, true_mask in items:
        blurred = _blurred_difference(query, counterfactual, blur, None, normalize)
        truth = np.asarray(true_mask, dtype=bool)
        if truth.shape != blurred.shape:
            raise ValueError(f"mask for {finding!r} has shape {truth.shape}, image has {blurred.shape}")
        row = [mask_iou(frame_from_difference(blurred, level, k).mask, truth) for level in levels]
        scores.setdefault(finding, []).append(row)
    chosen = {}
    for finding, rows in scores.items():
        mean = np.mean(rows, axis=0)
        best = max(range(len(levels)), key=lambda i: (round(float(mean[i]), 9), -abs(levels[i] - centre)))
        chosen[finding] = levels[best]
    return chosen


def resolve_threshold(
    setting: float | str | Mapping[str, float], finding: str, query, counterfactual, *, k: int = DEFAULT_K,
    blur: int = DEFAULT_BLUR, chest_box=None, candidates: Iterable[float] = DEFAULT_THRESHOLD_CANDIDATES,
    normalize: bool = False,
) -> float:
    """L for one frame: a number, "stable" (choose_threshold), or a {finding: L} dict (calibration)."""
    if isinstance(setting, str):
        if setting != "stable":
            raise ValueError(f"frame threshold must be a number, 'stable' or a {{finding: L}} dict, got {setting!r}")
        return choose_threshold(query, counterfactual, candidates, k=k, blur=blur, chest_box=chest_box,
                                normalize=normalize)
    if isinstance(setting, Mapping):
        return float(setting.get(finding, DEFAULT_THRESHOLD))
    return float(setting)


def estimate_chest_box(image, margin: int = 0) -> ChestBox:
    """Chest bounding box (x0, y0, x1, y1) of an X-ray: Otsu threshold, largest component's bbox.

    Text markers and borders are small bright components; the body is the largest. A constant
    image (no foreground) gives the full frame.
    """
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    array = as_gray_array(image)
    h, w = array.shape
    if float(array.max() - array.min()) < 1e-6:
        return 0, 0, w, h
    smooth = cv2.GaussianBlur(array, (5, 5), 0)
    foreground = smooth > threshold_otsu(smooth)
    regions = regionprops(label(foreground, connectivity=2))
    if not regions:
        return 0, 0, w, h
    largest = max(regions, key=lambda r: r.area)
    y0, x0, y1, x1 = largest.bbox
    return max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)
