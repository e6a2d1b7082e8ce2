"""Where each finding can lie on a frontal chest X-ray: coarse anatomical priors over the chest box.

Used as the pseudo mask M of region-specific editing (seed 001, SPEC section 3: `G = M * R`) when no
expert boxes or user masks are given, and by audits to ask whether evidence lies where a finding
cannot be. A prior is a rectangle in chest-box fractions (u across the image from its left edge,
v down from the top of the box; image right is the patient's left, so the heart extends to the right).

The rectangles were read off the phantom world's true finding masks (600 phantoms of the
`anatomical-prior fitting` seed range, 1st / 99th percentiles of mask pixels in box fractions, plus
a margin); `tests/test_anatomical_priors.py` checks them on other phantoms. They are deliberately
generous: the relevance map does the localising, the prior only rules out impossible places.
Findings without a prior (Support Devices: lines run outside the chest; No Finding) get the full image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cyclex.explain.chest_box import check_chest_box
from cyclex.findings import canonical_finding

# finding -> (u0, u1, v0, v1) in chest-box fractions (may reach outside [0, 1]: margins)
_LUNG_FIELDS = (-0.1, 1.1, -0.05, 1.05)
FINDING_PRIORS: dict[str, tuple[float, float, float, float]] = {
    "Enlarged Cardiomediastinum": (0.1, 0.9, -0.05, 0.8),
    "Cardiomegaly": (0.2, 1.15, 0.3, 1.15),
    "Lung Opacity": _LUNG_FIELDS,
    "Lung Lesion": _LUNG_FIELDS,
    "Edema": _LUNG_FIELDS,
    "Consolidation": _LUNG_FIELDS,
    "Pneumonia": _LUNG_FIELDS,
    "Atelectasis": (-0.1, 1.1, 0.4, 1.05),
    "Pneumothorax": (-0.1, 1.1, -0.1, 1.0),
    "Pleural Effusion": (-0.1, 1.1, 0.3, 1.15),
    "Pleural Other": _LUNG_FIELDS,
    "Fracture": (-0.2, 1.2, 0.05, 1.05),
}
PRIOR_FITTING_SEED = 424_242  # the seed registry's ANATOMICAL_PRIOR_FITTING set


def anatomical_prior(finding: str, shape: Sequence[int], chest_box: Sequence[int] | None) -> np.ndarray:
    """(H, W) bool mask of where `finding` can lie; all True without a chest box or without a prior.

    chest_box: (x0, y0, x1, y1) pixels, end-exclusive (the phantoms' and `estimate_chest_box`'s).
    """
    h, w = int(shape[0]), int(shape[1])
    name = canonical_finding(finding)
    if chest_box is None or name not in FINDING_PRIORS:
        return np.ones((h, w), dtype=bool)
    x0, y0, x1, y1 = check_chest_box(chest_box, (h, w))
    u0, u1, v0, v1 = FINDING_PRIORS[name]
    bw, bh = x1 - x0, y1 - y0
    left, right = int(np.floor(x0 + u0 * bw)), int(np.ceil(x0 + u1 * bw))
    top, bottom = int(np.floor(y0 + v0 * bh)), int(np.ceil(y0 + v1 * bh))
    mask = np.zeros((h, w), dtype=bool)
    mask[max(top, 0):min(bottom, h), max(left, 0):min(right, w)] = True
    return mask
