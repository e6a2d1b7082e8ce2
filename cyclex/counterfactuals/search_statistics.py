"""What many searches add up to: seed 000's ablation tables and the per-arm acceptance / cost summary.

- `ablation_tables(attempt_logs)`: the paper's tables from the attempt logs of many findings
  (`SearchResult.attempts`): success by delta x omega, by checkpoint, by null setting, and which
  CF_Score criteria stopped the attempts. `SearchingMaker` writes them to RUN/search_ablation.json.
- `SearchSummary.from_results(results)`: acceptance rate and UNet calls / passes / seconds per
  accepted counterfactual of one search arm (the rows of `benchmarks/search.py`).
- `measured_success_shares(logs)` / `replay_search(plan, logs)` / `fit_early_stop_rule(plan, logs)`:
  from whole-grid logs of validation findings (`MetricGuidedSearch(stop_at_first_accepted=False)`),
  the success share of each setting value, what a search order would have accepted and cost, and
  the early-stop rule that saves most without losing an accepted finding (issue 23).
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

from cyclex.counterfactuals.search import EarlyStopRule, SearchResult, cf_score_of

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "SearchSummary", "ablation_tables", "bootstrap_mean_ci",
           "fit_early_stop_rule", "measured_success_shares", "paired_difference_ci", "paired_ratio_ci",
           "replay_search"]

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


# -- whole-grid validation logs: shares, replays, early-stop rules (issue 23) ----------------------
PlannedRun = tuple[Any, str, "float | None", Sequence[tuple[float, Sequence[float]]]]


def _attempt_key(null_setting: Any, checkpoint: str, strength: float, guidance: float, fit_guidance) -> tuple:
    return (str(null_setting), str(checkpoint), float(strength), float(guidance),
            None if fit_guidance is None else float(fit_guidance))


def measured_success_shares(attempt_logs: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Success share of each setting value over whole-grid logs: of the findings some setting rescues,
    the share that a setting with this value rescues (`meets_acceptance`), per dimension.

    The form of `search.PAPER_SUCCESS_SHARES` (values as text), so it orders a `MetricGuidedSearch`.
    """
    dimensions = {"null_setting": "null_setting", "checkpoint": "checkpoint", "strength": "strength",
                  "guidance": "guidance"}
    rescued = [log for log in attempt_logs if any(a.get("meets_acceptance") for a in log)]
    shares: dict[str, dict[str, float]] = {}
    for dimension, key in dimensions.items():
        values = sorted({str(a[key]) for log in attempt_logs for a in log})
        shares[dimension] = {
            v: (sum(any(a.get("meets_acceptance") and str(a[key]) == v for a in log) for log in rescued) / len(rescued)
                if rescued else 0.0)
            for v in values
        }
    return shares


def replay_search(
    plan: Sequence[PlannedRun],
    attempt_logs: Sequence[Sequence[Mapping[str, Any]]],
    image_ids: Sequence[Any],
    early_stop: EarlyStopRule | None = None,
    reinvert_every_setting: bool = False,
) -> list[dict[str, Any]]:
    """What a search in `plan` order would have accepted and cost, replayed from whole-grid logs.

    plan: `MetricGuidedSearch.planned_settings()` (one entry per inversion, its edit batches in order).
    attempt_logs[i]: finding i's attempts over the whole grid (`stop_at_first_accepted=False`), each with
        null_setting, checkpoint, strength, guidance, fit_guidance, score, meets_acceptance,
        edit_unet_calls and inversion_unet_calls. image_ids[i]: finding i's image; the findings of one
        image share its inversions (as the search's inversion cache does), in the given order.
    reinvert_every_setting: Algorithm 1's cost: every attempt pays its own pivot and fit.
    Costs are UNet evaluations per batch item as logged; the guidance-1 pivot is the negative-prompt
    inversion's cost (the whole-grid run inverts that first), paid once per image and checkpoint.
    Returns per finding {accepted, unet_calls, n_attempts, gave_up}.
    """
    if len(attempt_logs) != len(image_ids):
        raise ValueError(f"replay_search needs one image id per log, got {len(image_ids)} for {len(attempt_logs)}")
    inversion_cost: dict[tuple, float] = defaultdict(float)
    for log, image in zip(attempt_logs, image_ids, strict=True):
        for a in log:
            key = (image, str(a["null_setting"]), str(a["checkpoint"]),
                   None if a.get("fit_guidance") is None else float(a["fit_guidance"]))
            inversion_cost[key] = max(inversion_cost[key], float(a.get("inversion_unet_calls", 0.0)))
    paid: set[tuple] = set()
    out = []
    for index, (log, image) in enumerate(zip(attempt_logs, image_ids, strict=True)):
        by_setting = {_attempt_key(a["null_setting"], a["checkpoint"], a["strength"], a["guidance"],
                                   a.get("fit_guidance")): a for a in log}
        calls, tried, accepted, gave_up, checked = 0.0, [], False, False, early_stop is None
        for null, checkpoint, fit_guidance, batches in plan:
            fit = None if fit_guidance is None else float(fit_guidance)
            pivot = inversion_cost[(image, "negative-prompt", str(checkpoint), None)]
            own = 0.0 if str(null) == "negative-prompt" else inversion_cost[(image, str(null), str(checkpoint), fit)]
            for strength, guidances in batches:
                batch = []
                for g in guidances:
                    key = _attempt_key(null, checkpoint, strength, g, fit)
                    if key not in by_setting:
                        raise KeyError(f"finding {index}: the whole-grid log has no attempt {key}; "
                                       "replay only plans inside the logged grid")
                    batch.append(by_setting[key])
                if reinvert_every_setting:
                    calls += len(batch) * (pivot + own)
                else:
                    for cost_key, cost in (((image, str(checkpoint), "pivot"), pivot),
                                           ((image, str(null), str(checkpoint), fit), own)):
                        if cost_key not in paid:
                            paid.add(cost_key)
                            calls += cost
                calls += sum(float(a["edit_unet_calls"]) for a in batch)
                tried.extend(batch)
                if any(a.get("meets_acceptance") for a in batch):
                    accepted = True
                    break
                if not checked and len(tried) >= early_stop.after_attempts:
                    checked = True
                    gave_up = early_stop.gives_up(tried)
                    if gave_up:
                        break
            if accepted or gave_up:
                break
        out.append({"accepted": accepted, "unet_calls": calls, "n_attempts": len(tried), "gave_up": gave_up})
    return out


def fit_early_stop_rule(
    plan: Sequence[PlannedRun],
    attempt_logs: Sequence[Sequence[Mapping[str, Any]]],
    image_ids: Sequence[Any],
    after_attempts: Sequence[int] = (1, 2, 3, 4, 6, 8),
    below_scores: Sequence[int] = (1, 2, 3, 4, 5),
    fitted_on: str = "",
) -> dict[str, Any]:
    """The early-stop rule (after_attempts x below_score) with the fewest replayed UNet evaluations
    that loses no finding the same order accepts without a rule; candidates tried and their figures.

    Fit it on validation findings only. Returns {"rule": EarlyStopRule or None (no rule saves
    anything), "without_rule": {...}, "candidates": [{after_attempts, below_score, accepted,
    unet_calls, gave_up}, ...]}.
    """
    def totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return {"accepted": int(sum(r["accepted"] for r in rows)), "unet_calls": float(sum(r["unet_calls"] for r in rows)),
                "gave_up": int(sum(r["gave_up"] for r in rows))}

    free = replay_search(plan, attempt_logs, image_ids)
    free_accepted = [r["accepted"] for r in free]
    base = totals(free)
    candidates, best = [], None
    for m in after_attempts:
        for score in below_scores:
            rule = EarlyStopRule(int(m), int(score), fitted_on)
            rows = replay_search(plan, attempt_logs, image_ids, rule)
            loses = sum(a and not r["accepted"] for a, r in zip(free_accepted, rows, strict=True))
            row = {"after_attempts": int(m), "below_score": int(score), **totals(rows), "findings_lost": int(loses)}
            candidates.append(row)
            if loses == 0 and row["unet_calls"] < base["unet_calls"] and (
                    best is None or row["unet_calls"] < best[1]["unet_calls"]):
                best = (rule, row)
    return {"rule": None if best is None else best[0], "without_rule": base, "candidates": candidates}
