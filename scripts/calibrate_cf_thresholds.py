"""Calibrate CF_Score thresholds for your own scorers: the file `--thresholds` takes.

    python scripts/calibrate_cf_thresholds.py --pairs pairs.csv --classifier xrv:densenet121-res224-all \
        --encoder classifier --lpips alex --out cf_thresholds.json [--coverage 0.9]

A threshold belongs to its scorer: seed 000's Table 2 (LPIPS < 0.2, CLIP cosine > 0.92, FET > 4) was
set for CLIP and real LPIPS, so with another encoder (e.g. the classifier's own features) or another
LPIPS those criteria are reported "not applicable" until a file made here is passed. pairs.csv has
the columns factual, counterfactual (image paths, relative to the CSV's folder) and finding: pairs
whose counterfactual is known to be right (e.g. accepted by a reader). Each threshold admits
`--coverage` of them (`cyclex.explain.cf_threshold_calibration.calibrate_cf_thresholds`); the file
records the scorers (weights and sha256), the pairs file's sha256 and the coverage.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
import torch


def read_pairs(path: Path) -> list[dict[str, str]]:
    """Rows of pairs.csv with absolute image paths; a missing column or file fails naming it."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no pairs")
    missing = {"factual", "counterfactual", "finding"} - set(rows[0])
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (expected factual, counterfactual, finding)")
    for row in rows:
        for key in ("factual", "counterfactual"):
            image = (path.parent / row[key]).resolve()
            if not image.is_file():
                raise FileNotFoundError(f"{path}: {key} image {image} does not exist")
            row[key] = str(image)
    return rows


def _gray(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None, None]


def main(argv: list[str] | None = None) -> Path:
    from cyclex.explain.cf_threshold_calibration import calibrate_cf_thresholds, save_cf_thresholds
    from cyclex.explain.scores import CounterfactualScorer
    from cyclex.provenance import environment, file_sha256
    from cyclex.specs.scorers import load_scorers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, required=True, help="CSV: factual, counterfactual, finding")
    parser.add_argument("--classifier", default="auto", help="as `cyclex evaluate --classifier`")
    parser.add_argument("--encoder", default="auto", help="as `cyclex evaluate --encoder`")
    parser.add_argument("--lpips", default="auto", help="as `cyclex evaluate --lpips`")
    parser.add_argument("--coverage", type=float, default=0.9, help="share of the true pairs each threshold admits")
    parser.add_argument("--out", type=Path, required=True, help="cf_thresholds.json to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pairs = read_pairs(args.pairs)
    scorers = load_scorers(args.classifier, args.encoder, args.lpips, demo=False)
    if scorers.classifier is None or scorers.encoder is None or scorers.lpips is None:
        raise SystemExit("calibration needs all three scorers (classifier, encoder, LPIPS); none may be 'none'")
    scorer = CounterfactualScorer(scorers.encoder, scorers.classifier, lpips=scorers.lpips)
    values: dict[str, list[float]] = {}
    with torch.no_grad():
        for row in pairs:
            raw = scorer.raw_values(_gray(row["factual"]), _gray(row["counterfactual"]), row["finding"])
            for key, tensor in raw.items():
                values.setdefault(key, []).append(float(tensor[0]))
    thresholds = calibrate_cf_thresholds(values, coverage=args.coverage)
    described = scorer.describe()
    path = save_cf_thresholds(args.out, thresholds, {
        "procedure": "scripts/calibrate_cf_thresholds.py: calibrate_cf_thresholds on true counterfactual pairs",
        "coverage": args.coverage, "n_pairs": len(pairs), "pairs": str(args.pairs.resolve()),
        "pairs_sha256": file_sha256(args.pairs), "specs": scorers.specs,
        "scorers": {role: described[role] for role in ("lpips", "clip_encoder", "cpg_classifier")},
        "environment": environment(),
    })
    logging.info("calibrated on %d pairs -> %s: %s", len(pairs), path, thresholds)
    return path


if __name__ == "__main__":
    main()
