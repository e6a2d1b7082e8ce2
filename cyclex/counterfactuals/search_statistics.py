"""What many searches add up to: seed 000's ablation tables and the per-arm acceptance / cost summary.

- `ablation_tables(attempt_logs)`: the paper's tables from the attempt logs of many findings
  (`SearchResult.attempts`): success by delta x omega, by checkpoint, by null setting, and which
  CF_Score criteria stopped the attempts. `SearchingMaker` writes them to RUN/search_ablation.json.
- `SearchSummary.from_results(results)`: acceptance rate and UNet calls / passes / seconds per
  accepted counterfactual of one search arm (the rows of `benchmarks/search.py`).
- `bootstrap_mean_ci(values)` / `paired_difference_ci(a, b)`: percentile-bootstrap 95 % intervals
  over findings (fixed seed) for a rate or mean, and for the difference of two arms measured on the
  same findings (the findings are resampled jointly, so the pairing is kept).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cyclex.counterfactuals.search import SearchResult, cf_score_of

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "SearchSummary", "ablation_tables", "bootstrap_mean_ci",
           "paired_difference_ci", "paired_ratio_ci"]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same intervals on every run of the same data


def ablation_tables(attempt_logs: Sequence[Sequence[Mapping[str, Any]]], required_score: int = 5) -> dict[str, Any]:
    """Seed 000's ablations from per-finding attempt logs (`SearchResult.attempts`).

    For each cell (delta x omega, checkpoint, null setting): attempts tried, attempts reaching the
    required CF_Score, accepted attempts, and share_of_accepted = the cell's share of the findings
    accepted (the paper's "success shares"). failed_criteria: attempts failing each criterion.
    """
    tables: dict[str, dict[str, dict[str, float]]] = {}
    dimensions = {
        "by_strength_guidance": lambda a: f"delta={a['strength']:g}|omega={a['guidance']:g}",
        "by_checkpoint": lambda a: str(a["checkpoint"]),
        "by_null_setting": lambda a: str(a["null_setting"]),
    }
    n_accepted = sum(any(a.get("accepted") for a in log) for log in attempt_logs)
    for table, cell_of in dimensions.items():
        cells: dict[str, dict[str, float]] = defaultdict(lambda: {"attempts": 0, "score_passed": 0, "accepted": 0})
        for log in attempt_logs:
            for attempt in log:
                cell = cells[cell_of(attempt)]
                cell["attempts"] += 1
                cell["score_passed"] += int(attempt["score"] >= required_score)
                cell["accepted"] += int(bool(attempt.get("accepted")))
        for cell in cells.values():
            cell["share_of_accepted"] = cell["accepted"] / n_accepted if n_accepted else 0.0
        tables[table] = dict(sorted(cells.items()))
    # which CF_Score criteria stop the attempts (what to tune or recalibrate first)
    failed: dict[str, int] = defaultdict(int)
    for log in attempt_logs:
        for attempt in log:
            for criterion in attempt.get("failed", ()):
                failed[criterion] += 1
    tables["failed_criteria"] = dict(sorted(failed.items()))
    return {"n_findings": len(attempt_logs), "n_accepted": n_accepted, **tables}


@dataclass
class SearchSummary:
    """Acceptance and cost of one arm over many findings (benchmark rows)."""

    acceptance_rate: float
    unet_calls_per_accepted: float | None
    unet_passes_per_accepted: float | None
    seconds_per_accepted: float | None
    n_findings: int
    n_accepted: int
    unet_calls_total: int
    unet_passes_total: int
    seconds_total: float
    mean_score: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_results(cls, results: Sequence[SearchResult]) -> SearchSummary:
        n = len(results)
        accepted = sum(r.accepted for r in results)
        calls = sum(r.unet_calls for r in results)
        passes = sum(r.unet_passes for r in results)
        seconds = sum(r.seconds for r in results)
        return cls(
            acceptance_rate=accepted / n if n else 0.0,
            unet_calls_per_accepted=calls / accepted if accepted else None,
            unet_passes_per_accepted=passes / accepted if accepted else None,
            seconds_per_accepted=seconds / accepted if accepted else None,
            n_findings=n,
            n_accepted=accepted,
            unet_calls_total=int(calls),
            unet_passes_total=int(passes),
            seconds_total=seconds,
            mean_score=float(np.mean([cf_score_of(r.score) for r in results])) if n else 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices of findings drawn with replacement."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one finding")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(int(resamples), n))


def _percentiles(samples: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return [float(low), float(high)]


def bootstrap_mean_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = 0.95) -> list[float]:
    """Percentile-bootstrap interval [low, high] of the mean of per-finding values (a rate for 0/1 values)."""
    x = np.asarray(values, dtype=float)
    idx = _resample_indices(len(x), resamples, seed)
    return _percentiles(x[idx].mean(axis=1), level)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict[str, Any]:
    """mean(a) - mean(b) over the same findings, with its paired percentile-bootstrap interval.

    a[i] and b[i] belong to finding i (two arms, one finding): each resample draws findings and
    keeps both arms' values of a drawn finding together. n_a_only / n_b_only: findings where only
    a (only b) is positive, i.e. for 0/1 acceptance the discordant pairs.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired arms need one value per finding each, got {x.shape} and {y.shape}")
    idx = _resample_indices(len(x), resamples, seed)
    d = x - y
    return {"difference": float(d.mean()), "ci95": _percentiles(d[idx].mean(axis=1), level),
            "n_findings": int(len(x)), "n_a_only": int(((x > 0) & (y <= 0)).sum()),
            "n_b_only": int(((y > 0) & (x <= 0)).sum())}


def paired_ratio_ci(a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict[str, Any]:
    """sum(a) / sum(b) over the same findings (a cost ratio), with its paired bootstrap interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired arms need one value per finding each, got {x.shape} and {y.shape}")
    if y.sum() <= 0:
        return {"ratio": None, "ci95": None, "n_findings": int(len(x))}
    idx = _resample_indices(len(x), resamples, seed)
    den = y[idx].sum(axis=1)
    ratios = x[idx].sum(axis=1) / np.where(den > 0, den, np.nan)
    return {"ratio": float(x.sum() / y.sum()), "ci95": _percentiles(ratios[~np.isnan(ratios)], level),
            "n_findings": int(len(x))}
