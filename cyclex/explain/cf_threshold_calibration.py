"""CF_Score thresholds calibrated on true counterfactual pairs, and their file `cf_thresholds.json`.

Thresholds (CF_Score, seed 000 eq. 3) are per study, as the paper says. With real weights (CLIP,
LPIPS, a strong classifier) use seed 000's Table 2 values (`CFThresholds()` defaults). Where the
scorer runs on stand-ins whose values Table 2 does not describe (the phantom world: no CLIP or LPIPS
weights), calibrate the thresholds once on pairs whose counterfactual is known to be right:

1. score true (factual, counterfactual) pairs with the scorer (`CounterfactualScorer.raw_values`);
2. `calibrate_cf_thresholds(values)`: each faithfulness threshold is the quantile of the true pairs'
   values that admits `coverage` (default 90 %) of them (upper quantile for LPIPS and L2, lower for
   the cosine), the effectiveness thresholds (CPG, FET) the lower (1 - coverage) quantile, and CPG
   never below Table 2's 0.1 (an edit must move the classifier);
3. `save_cf_thresholds` writes them with how they were calibrated; `load_cf_thresholds` reads them back.

The phantom demo's calibration (which pairs, which stand-ins) is `cyclex.demo.cf_thresholds`.
(Frame thresholds L are another calibration: `cyclex.explain.frames`.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from cyclex.atomic_io import write_text_atomic
from cyclex.explain.scores import CFThresholds

__all__ = ["calibrate_cf_thresholds", "save_cf_thresholds", "load_cf_thresholds"]

# the raw values calibration needs, as `CounterfactualScorer.raw_values` names them
CALIBRATION_VALUES = ("lpips", "clip_cosine", "l2", "cpg", "fet")


def calibrate_cf_thresholds(values: Mapping[str, Sequence[float]], coverage: float = 0.9,
                            min_cpg: float = CFThresholds().cpg) -> CFThresholds:
    """Thresholds admitting `coverage` of ground-truth counterfactual pairs (see module doc, step 2).

    values: raw metric values of true (factual, counterfactual) pairs, keys lpips, clip_cosine, l2,
    cpg, fet (as `CounterfactualScorer.raw_values` names them), each a non-empty sequence.
    """
    if not 0.5 <= coverage < 1.0:
        raise ValueError(f"coverage must be in [0.5, 1), got {coverage}")
    missing = [k for k in CALIBRATION_VALUES if k not in values or len(values[k]) == 0]
    if missing:
        raise ValueError(f"calibrate_cf_thresholds needs values for {missing}")
    arrays = {k: np.asarray(values[k], dtype=np.float64) for k in CALIBRATION_VALUES}
    bad = [k for k, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"calibration values contain NaN / inf for {bad}")
    return CFThresholds(
        lpips=float(np.quantile(arrays["lpips"], coverage)),
        clip=float(np.quantile(arrays["clip_cosine"], 1.0 - coverage)),
        l2=float(np.quantile(arrays["l2"], coverage)),
        cpg=max(float(min_cpg), float(np.quantile(arrays["cpg"], 1.0 - coverage))),
        fet=float(np.quantile(arrays["fet"], 1.0 - coverage)),
    )


def save_cf_thresholds(path: str | Path, thresholds: CFThresholds, provenance: Mapping[str, Any]) -> Path:
    """Write `cf_thresholds.json` (thresholds + how they were calibrated) atomically."""
    path = Path(path)
    write_text_atomic(path, json.dumps({"thresholds": asdict(thresholds), "provenance": dict(provenance)}, indent=2))
    return path


def load_cf_thresholds(path: str | Path) -> CFThresholds:
    """The `CFThresholds` of a `cf_thresholds.json` (`save_cf_thresholds`); names not in CFThresholds fail."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        raw = data["thresholds"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected JSON with a 'thresholds' object ({err})") from err
    names = {f.name for f in fields(CFThresholds)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"{path}: unknown threshold names {sorted(unknown)}; expected {sorted(names)}")
    return CFThresholds(**{k: float(v) for k, v in raw.items()})
