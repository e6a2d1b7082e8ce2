"""Metric-guided search over inference settings (seed 000, Algorithm 1), made cheap.

Seed 000 raises valid counterfactuals from 33 % to 93 % by trying, per finding, null-text settings
H_null x checkpoints {best-L2, best-L1} x denoising strengths delta {1.0, 0.9, 0.8} x guidance
omega {7, 8, 9, 10}, and keeping the first counterfactual with CF_Score = 5; it re-inverts at every
one of the 48 settings. `MetricGuidedSearch` accepts the same way (CF_Score >= required **and** the
cycle verified) for a fraction of the work:

- one inversion per (null setting, checkpoint) serves every strength (sampling starts later on the
  same pivot trajectory) and every guidance (the null embeddings are fitted once, at the maker's
  inversion guidance); the guidance-1 pivot is shared by both null settings (inversion cache);
- the guidance values of one (null, checkpoint, strength) run as one UNet batch
  (`guidance_batch_size=None`), or in smaller batches that stop at the first accepted one
  (`guidance_batch_size=1`: fewest UNet evaluations, since omega 7 alone holds most successes);
- null settings that need no optimisation (negative-prompt, direct inversion) are tried before
  null-text inversion when listed in `null_settings` (they reuse the same pivot trajectory);
- the order follows the paper's success shares: omega 7 first (84 % of successes), delta 1.0, then
  0.8, then 0.9 (40 / 34 / 25 %), best-L2 before best-L1 (83 %), default null before underfit;
- it stops at the first accepted result; the cheap metrics (CF_Score) are computed first and the
  report generator (the cycle check) only sees candidates that pass CF_Score.

Every attempt is logged (settings, score, failed criteria, raw values, verified, UNet calls,
seconds); `ablation_tables` aggregates the logs into the paper's tables (success by delta x omega,
by checkpoint, by null setting). `algorithm1_search` is Algorithm 1 as written (re-inverting at
every setting, the inversion fitted at the sampling omega), the baseline of `benchmarks/search.py`.

Thresholds (CF_Score) are per study, as the paper says. With real weights (CLIP, LPIPS, a strong
classifier) use seed 000's Table 2 values (`CFThresholds()` defaults). The phantom world has no
CLIP or LPIPS weights, so the demo scores with stand-ins and calibrates their thresholds once:
1. stand-in encoder: the penultimate features of the phantom classifier (trained on phantoms),
   used for both the "CLIP" cosine / L1 / L2 and the FET; LPIPS: the `lpips` package's architecture
   on the same stand-in features when no backbone weights exist;
2. calibration pairs: phantoms and their ground-truth counterfactuals, which the phantom generator
   renders exactly (same seed, the finding removed) - something real data never offers; the
   counterfactual side passes through the demo SDs' VAE first (calibration version 2, see
   `cyclex.demo.cf_thresholds`), since no counterfactual a tailored SD makes is sharper than that;
3. `calibrate_thresholds(values)`: each faithfulness threshold is the quantile of the true pairs'
   values that admits `coverage` (default 90 %) of them (upper quantile for LPIPS and L2, lower for
   the cosine), the effectiveness thresholds (CPG, FET) the lower (1 - coverage) quantile, and CPG
   never below Table 2's 0.1 (an edit must move the classifier);
4. the thresholds are written once as `cf_thresholds.json` beside the demo models, with the
   calibration seeds, n and coverage, and read back by every later run (`load_thresholds`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cyclex.atomic_io import write_text_atomic
from cyclex.counterfactuals.inversion_cache import InversionCache
from cyclex.explain.scores import CFThresholds

logger = logging.getLogger(__name__)

# Seed 000's success shares per setting value (share of the successful counterfactuals).
# cyclex's default H_null: the optimisation-free inversions first (negative-prompt, then direct),
# then the paper's two null-text settings.
DEFAULT_NULL_SETTINGS: tuple[str, ...] = ("negative-prompt", "direct", "default", "underfit")
# The rest of seed 000's grid.
DEFAULT_CHECKPOINTS: tuple[str, ...] = ("best_l2", "best_l1")
DEFAULT_STRENGTHS: tuple[float, ...] = (1.0, 0.9, 0.8)
DEFAULT_GUIDANCES: tuple[float, ...] = (7, 8, 9, 10)
PAPER_SUCCESS_SHARES: dict[str, dict[Any, float]] = {
    "null_setting": {"default": 0.9, "underfit": 0.1},
    "checkpoint": {"best_l2": 0.83, "best_l1": 0.17},
    "strength": {1.0: 0.40, 0.8: 0.34, 0.9: 0.25},
    "guidance": {7.0: 0.84},
}

CycleCheck = Callable[[torch.Tensor, Sequence[str]], Sequence[bool]]


def order_by_success_share(values: Sequence, dimension: str) -> list:
    """Values sorted by the paper's success share (highest first); unknown values keep their order.

    Null settings that need no optimisation (negative-prompt, direct inversion) go first whatever
    their share: trying them costs a fraction of one null-text fit (cyclex's choice, not the paper's).
    """
    from cyclex.counterfactuals.nti import FAST_NULL_SETTINGS

    shares = PAPER_SUCCESS_SHARES.get(dimension, {})

    def cheap_first(value) -> int:
        return 0 if dimension == "null_setting" and isinstance(value, str) and value in FAST_NULL_SETTINGS else 1

    def share(value) -> float:
        if isinstance(value, (list, tuple)):
            return -1.0  # custom (inner_steps, eps) null settings: no paper share
        key = float(value) if isinstance(value, (int, float)) else value
        return shares.get(key, -1.0)

    return sorted(values, key=lambda v: (cheap_first(v), -share(v)))


@dataclass
class SearchResult:
    """Outcome of the search for one finding.

    image: (1, H, W) in [0, 1], the accepted counterfactual or the best one by (score, metrics).
    score: the scorer's result for it (`.score` int, `.values` raw metrics when available).
    """

    image: torch.Tensor
    accepted: bool
    verified: bool | None
    score: Any
    setting: dict[str, Any]
    attempts: list[dict[str, Any]]
    unet_calls: int
    seconds: float
    finding: str = ""
    unet_passes: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "accepted": self.accepted,
            "verified": self.verified,
            "score": _score_int(self.score),
            "setting": self.setting,
            "unet_calls": self.unet_calls,
            "unet_passes": self.unet_passes,
            "seconds": self.seconds,
            "n_attempts": len(self.attempts),
        }


def _score_int(result: Any) -> int:
    value = getattr(result, "score", result)
    return int(value)


def _score_values(result: Any) -> dict[str, float]:
    values = getattr(result, "values", None)
    return {k: float(v) for k, v in values.items()} if isinstance(values, Mapping) else {}


def _metric_key(result: Any) -> tuple[float, ...]:
    """Tie-break among equal CF_Scores: larger CPG, then lower LPIPS, higher cosine, lower L2."""
    values = _score_values(result)

    def get(name: str, sign: float) -> float:
        v = values.get(name, math.nan)
        return -math.inf if math.isnan(v) else sign * v

    return (get("cpg", 1.0), get("lpips", -1.0), get("clip_cosine", 1.0), get("l2", -1.0))


def _unet_calls(maker: Any) -> int:
    """UNet evaluations per batch item so far (a batch of 8 latents counts 8)."""
    ld = getattr(maker, "ld", None)
    return int(getattr(ld, "unet_calls", getattr(maker, "unet_calls", 0)))


def _unet_passes(maker: Any) -> int:
    """UNet forward passes so far (a batch of 8 latents counts 1): what wall time follows."""
    ld = getattr(maker, "ld", None)
    return int(getattr(ld, "unet_forward_passes", getattr(maker, "unet_forward_passes", 0)))


def _score_batch(scorer: Any, factual: torch.Tensor, counterfactuals: torch.Tensor, finding: str) -> list:
    score = getattr(scorer, "score", None)
    results = score(factual, counterfactuals, finding) if callable(score) else scorer(factual, counterfactuals, finding)
    results = list(results)
    if len(results) != counterfactuals.shape[0]:
        raise ValueError(f"scorer returned {len(results)} results for {counterfactuals.shape[0]} counterfactuals")
    return results


def _as_single_image(image: torch.Tensor) -> torch.Tensor:
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[:2] != (1, 1):
        raise ValueError(f"image must be (1, H, W) or (1, 1, H, W) in [0, 1], got {tuple(image.shape)}")
    return image.float()


class MetricGuidedSearch:
    """Per-finding search over (null setting, checkpoint, strength, guidance); see module doc.

    makers: {checkpoint: maker} (null settings through `maker.with_null_setting`) or a factory
        `factory(checkpoint, null_setting) -> maker`. A maker provides `invert(images, prompts)`
        and `edit(inversion, target_prompts, guidances=, strength=, output_size=) -> (B, G, 1, H, W)`
        (`InvertThenEditMaker` does). Makers without null settings (negative-prompt, direct) search
        checkpoints x strengths x guidances only.
    scorer: a `CounterfactualScorer` (`.score(factual, cf, finding) -> list`) or a callable with
        the same arguments; results need `.score` (0..5) and optionally `.values`.
    cycle_check: `cycle_check(cf_images (N, 1, H, W), findings) -> N bools`, True when the
        regenerated report no longer holds the finding.
    """

    def __init__(
        self,
        makers: Mapping[str, Any] | Callable[[str, Any], Any],
        scorer: Any,
        cycle_check: CycleCheck,
        null_settings: Sequence = DEFAULT_NULL_SETTINGS,
        checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS,
        strengths: Sequence[float] = DEFAULT_STRENGTHS,
        guidances: Sequence[float] = DEFAULT_GUIDANCES,
        required_score: int = 5,
        order_by_paper_shares: bool = True,
        log_path: str | Path | None = None,
        guidance_batch_size: int | None = None,
    ) -> None:
        if guidance_batch_size is not None and int(guidance_batch_size) < 1:
            raise ValueError(f"guidance_batch_size must be >= 1 or None (all guidances in one batch), got {guidance_batch_size}")
        for name, values in (("null_settings", null_settings), ("checkpoints", checkpoints),
                             ("strengths", strengths), ("guidances", guidances)):
            if len(values) == 0:
                raise ValueError(f"MetricGuidedSearch.{name} must not be empty")
        if not 0 <= int(required_score) <= 5:
            raise ValueError(f"required_score must be in 0..5, got {required_score}")
        if isinstance(makers, Mapping):
            missing = [c for c in checkpoints if c not in makers]
            if missing:
                raise KeyError(f"no maker for checkpoints {missing}; makers given for {sorted(makers)}")
        elif not callable(makers):
            raise TypeError("makers must be {checkpoint: maker} or a factory(checkpoint, null_setting)")
        self.makers = makers
        self.scorer = scorer
        self.cycle_check = cycle_check
        order = order_by_success_share if order_by_paper_shares else (lambda values, _dim: list(values))
        self.null_settings = order(list(null_settings), "null_setting")
        self.checkpoints = order(list(checkpoints), "checkpoint")
        self.strengths = [float(s) for s in order(list(strengths), "strength")]
        self.guidances = [float(g) for g in order(list(guidances), "guidance")]
        self.required_score = int(required_score)
        self.guidance_batch_size = None if guidance_batch_size is None else int(guidance_batch_size)
        self.log_path = Path(log_path) if log_path is not None else None
        self._log_lines: list[str] = []
        self._maker_memo: dict[tuple, Any] = {}

    # -- makers --------------------------------------------------------------------------------
    def maker_for(self, checkpoint: str, null_setting: Any) -> Any:
        key = (checkpoint, json.dumps(null_setting, default=str))
        if key not in self._maker_memo:
            if isinstance(self.makers, Mapping):
                maker = self.makers[checkpoint]
                if null_setting is not None and hasattr(maker, "with_null_setting"):
                    maker = maker.with_null_setting(null_setting)
            else:
                maker = self.makers(checkpoint, null_setting)
            for method in ("invert", "edit"):
                if not callable(getattr(maker, method, None)):
                    raise TypeError(f"maker for {checkpoint!r} lacks {method}(); use an InvertThenEditMaker")
            self._maker_memo[key] = maker
        return self._maker_memo[key]

    def _null_settings_for(self, checkpoint: str) -> list:
        if isinstance(self.makers, Mapping) and not hasattr(self.makers[checkpoint], "with_null_setting"):
            return [None]
        return list(self.null_settings)

    # -- one finding ---------------------------------------------------------------------------
    def search(self, image: torch.Tensor, source_prompt: str, target_prompt: str, finding: str) -> SearchResult:
        """image (1, H, W) or (1, 1, H, W) in [0, 1] -> the accepted (or best) counterfactual."""
        factual = _as_single_image(image)
        size = tuple(factual.shape[-2:])
        start_time = time.perf_counter()
        attempts: list[dict[str, Any]] = []
        best: tuple | None = None
        total_calls = 0
        passes_start = {}
        for null_setting in self.null_settings:
            for checkpoint in self.checkpoints:
                effective_null = null_setting
                if self._null_settings_for(checkpoint) == [None]:
                    if null_setting != self.null_settings[0]:
                        continue  # a maker without null settings is tried once per checkpoint
                    effective_null = None
                maker = self.maker_for(checkpoint, effective_null)
                passes_start.setdefault(id(getattr(maker, "ld", maker)), (maker, _unet_passes(maker)))
                t0, c0 = time.perf_counter(), _unet_calls(maker)
                inversion = maker.invert(factual, [source_prompt])
                pending_calls, pending_seconds = _unet_calls(maker) - c0, time.perf_counter() - t0
                for strength, guidances in self._strength_guidance_batches():
                    t1, c1 = time.perf_counter(), _unet_calls(maker)
                    images = maker.edit(inversion, [target_prompt], guidances=guidances, strength=strength,
                                        output_size=size)[0]
                    calls = _unet_calls(maker) - c1 + pending_calls
                    seconds = time.perf_counter() - t1 + pending_seconds
                    pending_calls, pending_seconds = 0, 0.0
                    settings = [
                        {"null_setting": effective_null, "checkpoint": checkpoint, "strength": strength, "guidance": g}
                        for g in guidances
                    ]
                    group, accepted_index = self._judge(factual, images, finding, settings, calls, seconds)
                    attempts.extend(group)
                    total_calls += calls
                    for k, attempt in enumerate(group):
                        candidate = (attempt["score"], attempt["verified"] is True, _metric_key(attempt["_result"]))
                        if best is None or candidate > best[0]:
                            best = (candidate, images[k], attempt)
                    if accepted_index is not None:
                        passes = sum(_unet_passes(m) - p for m, p in passes_start.values())
                        return self._finish(images[accepted_index], group[accepted_index], attempts, finding,
                                            total_calls, start_time, accepted=True, passes=passes)
        assert best is not None  # every loop ran at least once (checked in __init__)
        passes = sum(_unet_passes(m) - p for m, p in passes_start.values())
        return self._finish(best[1], best[2], attempts, finding, total_calls, start_time, accepted=False,
                            passes=passes)

    def _strength_guidance_batches(self) -> list[tuple[float, list[float]]]:
        """(strength, guidances) in search order: each strength's guidances in batches of guidance_batch_size."""
        size = self.guidance_batch_size or len(self.guidances)
        return [(strength, self.guidances[i:i + size])
                for strength in self.strengths for i in range(0, len(self.guidances), size)]

    def _judge(self, factual, images, finding, settings, calls, seconds):
        """Score a guidance batch (cheap), cycle-check the passing ones (one generator call)."""
        t0 = time.perf_counter()
        results = _score_batch(self.scorer, factual.expand(images.shape[0], -1, -1, -1), images, finding)
        passing = [k for k, r in enumerate(results) if _score_int(r) >= self.required_score]
        verified: dict[int, bool] = {}
        if passing:
            answers = list(self.cycle_check(images[passing], [finding] * len(passing)))
            if len(answers) != len(passing):
                raise ValueError(f"cycle_check returned {len(answers)} answers for {len(passing)} images")
            verified = {k: bool(a) for k, a in zip(passing, answers, strict=True)}
        judge_seconds = time.perf_counter() - t0
        group, accepted_index = [], None
        n = len(results)
        for k, result in enumerate(results):
            ok = verified.get(k) is True and accepted_index is None
            if ok:
                accepted_index = k
            group.append({
                **settings[k],
                "score": _score_int(result),
                "failed": list(getattr(result, "failed", [])),
                "values": _score_values(result),
                "verified": verified.get(k),
                "accepted": ok,
                "unet_calls": calls / n,
                "seconds": (seconds + judge_seconds) / n,
                "_result": result,
            })
        return group, accepted_index

    def _finish(self, image, attempt, attempts, finding, total_calls, start_time, accepted, passes=0) -> SearchResult:
        setting = {k: attempt[k] for k in ("null_setting", "checkpoint", "strength", "guidance")}
        result = SearchResult(
            image=image.detach().cpu(),
            accepted=accepted,
            verified=attempt["verified"],
            score=attempt["_result"],
            setting=setting,
            attempts=[{k: v for k, v in a.items() if k != "_result"} for a in attempts],
            unet_calls=int(round(total_calls)),
            seconds=time.perf_counter() - start_time,
            finding=finding,
            unet_passes=int(passes),
        )
        self._log(result)
        return result

    def _log(self, result: SearchResult) -> None:
        if self.log_path is None:
            return
        self._log_lines.append(json.dumps({**result.summary(), "attempts": result.attempts}, default=str))
        write_text_atomic(self.log_path, "\n".join(self._log_lines) + "\n")

    def search_many(
        self, images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str],
        findings: Sequence[str],
    ) -> list[SearchResult]:
        """images (B, 1, H, W): one search per (image, prompt pair, finding)."""
        if not (images.shape[0] == len(source_prompts) == len(target_prompts) == len(findings)):
            raise ValueError("search_many needs one source prompt, target prompt and finding per image")
        return [self.search(images[i], source_prompts[i], target_prompts[i], findings[i]) for i in range(images.shape[0])]



def evaluate_setting(
    maker: Any, scorer: Any, cycle_check: CycleCheck, image: torch.Tensor, source_prompt: str, target_prompt: str,
    finding: str, strength: float, guidance: float, required_score: int = 5, extra: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Invert + sample one setting, score it, cycle-check it when it passes CF_Score.

    Returns (image (1, H, W), attempt dict with score, verified, accepted, unet_calls, seconds).
    """
    factual = _as_single_image(image)
    t0, c0, p0 = time.perf_counter(), _unet_calls(maker), _unet_passes(maker)
    inversion = maker.invert(factual, [source_prompt])
    cf = maker.edit(inversion, [target_prompt], guidances=[guidance], strength=strength,
                    output_size=tuple(factual.shape[-2:]))[0]
    calls = _unet_calls(maker) - c0
    result = _score_batch(scorer, factual, cf, finding)[0]
    verified = None
    if _score_int(result) >= required_score:
        verified = bool(list(cycle_check(cf, [finding]))[0])
    attempt = {
        **(extra or {}),
        "strength": float(strength),
        "guidance": float(guidance),
        "score": _score_int(result),
        "failed": list(getattr(result, "failed", [])),
        "values": _score_values(result),
        "verified": verified,
        "accepted": verified is True,
        "unet_calls": calls,
        "unet_passes": _unet_passes(maker) - p0,
        "seconds": time.perf_counter() - t0,
        "_result": result,
    }
    return cf[0], attempt


def algorithm1_search(
    makers: Mapping[str, Any] | Callable[[str, Any], Any],
    scorer: Any,
    cycle_check: CycleCheck,
    image: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    finding: str,
    null_settings: Sequence = ("default", "underfit"),
    checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    guidances: Sequence[float] = DEFAULT_GUIDANCES,
    required_score: int = 5,
) -> SearchResult:
    """Seed 000's Algorithm 1 as written: loops H_null, checkpoint, delta, omega in the given order,
    re-inverting at every setting (fresh cache; NTI fitted at the sampling omega), first accepted
    result returned, else the best by (score, metrics). Acceptance as in `MetricGuidedSearch`."""
    start_time = time.perf_counter()
    attempts: list[dict[str, Any]] = []
    best = None
    total_calls = 0
    for null_setting in null_settings:
        for checkpoint in checkpoints:
            if isinstance(makers, Mapping):
                base = makers[checkpoint]
                if hasattr(base, "with_null_setting"):
                    base = base.with_null_setting(null_setting)
                elif null_setting != null_settings[0]:
                    continue  # a maker without null settings has one H_null
            else:
                base = makers(checkpoint, null_setting)
            for strength in strengths:
                for guidance in guidances:
                    changes: dict[str, Any] = {"cache": InversionCache()}
                    if hasattr(base, "inversion_guidance"):
                        changes["inversion_guidance"] = float(guidance)
                    maker = base.replace(**changes) if hasattr(base, "replace") else base
                    cf, attempt = evaluate_setting(
                        maker, scorer, cycle_check, image, source_prompt, target_prompt, finding, strength, guidance,
                        required_score, {"null_setting": null_setting, "checkpoint": checkpoint},
                    )
                    attempts.append(attempt)
                    total_calls += attempt["unet_calls"]
                    key = (attempt["score"], attempt["verified"] is True, _metric_key(attempt["_result"]))
                    if best is None or key > best[0]:
                        best = (key, cf, attempt)
                    if attempt["accepted"]:
                        best = (key, cf, attempt)
                        return _algorithm1_result(best, attempts, finding, total_calls, start_time, True)
    return _algorithm1_result(best, attempts, finding, total_calls, start_time, False)


def _algorithm1_result(best, attempts, finding, total_calls, start_time, accepted) -> SearchResult:
    _, image, attempt = best
    return SearchResult(
        image=image.detach().cpu(),
        accepted=accepted,
        verified=attempt["verified"],
        score=attempt["_result"],
        setting={k: attempt[k] for k in ("null_setting", "checkpoint", "strength", "guidance")},
        attempts=[{k: v for k, v in a.items() if k != "_result"} for a in attempts],
        unet_calls=int(total_calls),
        seconds=time.perf_counter() - start_time,
        finding=finding,
        unet_passes=int(sum(a.get("unet_passes", 0) for a in attempts)),
    )


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


# -- threshold calibration for stand-in encoders (phantom world) ------------------------------
def calibrate_thresholds(values: Mapping[str, Sequence[float]], coverage: float = 0.9,
                         min_cpg: float = CFThresholds().cpg) -> CFThresholds:
    """Thresholds admitting `coverage` of ground-truth counterfactual pairs (see module doc, step 3).

    values: raw metric values of true (phantom, phantom without the finding) pairs, keys lpips,
    clip_cosine, l2, cpg, fet (as `CounterfactualScorer.raw_values` names them).
    """
    if not 0.5 <= coverage < 1.0:
        raise ValueError(f"coverage must be in [0.5, 1), got {coverage}")
    needed = ("lpips", "clip_cosine", "l2", "cpg", "fet")
    missing = [k for k in needed if k not in values or len(values[k]) == 0]
    if missing:
        raise ValueError(f"calibrate_thresholds needs values for {missing}")
    arrays = {k: np.asarray(values[k], dtype=np.float64) for k in needed}
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


def save_thresholds(path: str | Path, thresholds: CFThresholds, provenance: Mapping[str, Any]) -> Path:
    """Write `cf_thresholds.json` (thresholds + how they were calibrated) atomically."""
    path = Path(path)
    write_text_atomic(path, json.dumps({"thresholds": asdict(thresholds), "provenance": dict(provenance)}, indent=2))
    return path


def load_thresholds(path: str | Path) -> CFThresholds:
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
            mean_score=float(np.mean([_score_int(r.score) for r in results])) if n else 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
