"""Metric-guided search over inference settings (seed 000, Algorithm 1), made cheap.

Seed 000 raises valid counterfactuals from 33 % to 93 % by trying, per finding, null-text settings
H_null x checkpoints {best-L2, best-L1} x denoising strengths delta {1.0, 0.9, 0.8} x guidance
omega {7, 8, 9, 10}, and keeping the first counterfactual with CF_Score = 5; it re-inverts at every
one of the 48 settings. `MetricGuidedSearch` accepts the same way (CF_Score >= required **and** the
cycle verified) for a fraction of the work:

- one inversion per (null setting, checkpoint) serves every strength (sampling starts later on the
  same pivot trajectory) and every guidance (the null embeddings are fitted once, at the maker's
  inversion guidance); the guidance-1 pivot is shared by both null settings (inversion cache);
  with `fit_null_per_guidance=True` null-text inversion is fitted at each sampling guidance, as
  Algorithm 1 does, and only shared across strengths: the same candidates as Algorithm 1, so any
  saving comes from sharing, ordering and stopping early, not from a different method;
- the guidance values of one (null, checkpoint, strength) run as one UNet batch
  (`guidance_batch_size=None`), or in smaller batches that stop at the first accepted one
  (`guidance_batch_size=1`: fewest UNet evaluations, since omega 7 alone holds most successes);
- null settings that need no optimisation (negative-prompt, direct inversion) are tried before
  null-text inversion when listed in `null_settings` (they reuse the same pivot trajectory);
- the order follows the paper's success shares: omega 7 first (84 % of successes), delta 1.0, then
  0.8, then 0.9 (40 / 34 / 25 %), best-L2 before best-L1 (83 %), default null before underfit;
- it stops at the first accepted result; the cheap metrics (CF_Score) are computed first and the
  report generator (the cycle check) only sees candidates that pass CF_Score;
- optionally (issue 23) the order follows success shares measured on validation seeds
  (`success_shares`, same form as `PAPER_SUCCESS_SHARES`), and an `EarlyStopRule` gives up on a
  finding whose first attempts score far from acceptance (fitted on validation seeds: see
  `benchmarks/search.py --fit-validation`); `stop_at_first_accepted=False` tries the whole grid
  (validation logs from which such rules and shares are fitted).

Every attempt is logged (settings, score, failed criteria, raw values, verified, UNet calls,
seconds). Beside this module: `cyclex.counterfactuals.algorithm1` (Algorithm 1 as written, the
benchmark's baseline), `cyclex.counterfactuals.search_statistics` (the paper's ablation tables and
the per-arm summary over many searches), `cyclex.explain.cf_threshold_calibration` (CF_Score
thresholds for stand-in scorers) and `cyclex.counterfactuals.search_maker` (the search as a maker).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cyclex.atomic_io import write_text_atomic

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


def order_by_success_share(values: Sequence, dimension: str,
                           success_shares: Mapping[str, Mapping[Any, float]] | None = None) -> list:
    """Values sorted by success share (highest first; default the paper's); unknown values keep their order.

    Null settings that need no optimisation (negative-prompt, direct inversion) go first whatever
    their share: trying them costs a fraction of one null-text fit (cyclex's choice, not the paper's).
    success_shares: {dimension: {value: share}}, e.g. measured on validation seeds; keys of strength
    and guidance shares may be numbers or their text ("1.0").
    """
    from cyclex.counterfactuals.nti import FAST_NULL_SETTINGS

    table = PAPER_SUCCESS_SHARES if success_shares is None else success_shares
    shares = {(float(k) if dimension in ("strength", "guidance") else k): float(v)
              for k, v in table.get(dimension, {}).items()}

    def cheap_first(value) -> int:
        return 0 if dimension == "null_setting" and isinstance(value, str) and value in FAST_NULL_SETTINGS else 1

    def share(value) -> float:
        if isinstance(value, (list, tuple)):
            return -1.0  # custom (inner_steps, eps) null settings: no paper share
        key = float(value) if isinstance(value, (int, float)) else value
        return shares.get(key, -1.0)

    return sorted(values, key=lambda v: (cheap_first(v), -share(v)))


@dataclass(frozen=True)
class EarlyStopRule:
    """Give up on a finding whose first attempts score far from acceptance (issue 23).

    Once `after_attempts` attempts of a finding are judged (a guidance batch counts all its items),
    the search stops unless one of them reached CF_Score `below_score` or more. Fit it on
    validation seeds (never on the seeds a benchmark reports); `fitted_on` says where it came from.
    """

    after_attempts: int
    below_score: int
    fitted_on: str = ""

    def __post_init__(self) -> None:
        if int(self.after_attempts) < 1:
            raise ValueError(f"EarlyStopRule.after_attempts must be >= 1, got {self.after_attempts}")
        if not 0 <= int(self.below_score) <= 5:
            raise ValueError(f"EarlyStopRule.below_score must be in 0..5 (CF_Score), got {self.below_score}")

    def gives_up(self, attempts: Sequence[Mapping[str, Any]]) -> bool:
        """True when the first `after_attempts` attempts are all below `below_score` (none accepted)."""
        first = attempts[: int(self.after_attempts)]
        if len(first) < int(self.after_attempts) or any(a.get("accepted") for a in first):
            return False
        return max(int(a["score"]) for a in first) < int(self.below_score)

    def to_dict(self) -> dict[str, Any]:
        return {"after_attempts": int(self.after_attempts), "below_score": int(self.below_score),
                "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EarlyStopRule:
        missing = [k for k in ("after_attempts", "below_score") if k not in data]
        if missing:
            raise ValueError(f"early-stop rule lacks {missing}; expected after_attempts, below_score")
        return cls(int(data["after_attempts"]), int(data["below_score"]), str(data.get("fitted_on", "")))


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
    gave_up: bool = False  # an EarlyStopRule ended the search

    @property
    def cycle_checks(self) -> int:
        """Candidates the report generator saw (the others failed the cheap CF_Score first)."""
        return sum(a.get("verified") is not None for a in self.attempts)

    def summary(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "accepted": self.accepted,
            "verified": self.verified,
            "score": cf_score_of(self.score),
            "setting": self.setting,
            "unet_calls": self.unet_calls,
            "unet_passes": self.unet_passes,
            "seconds": self.seconds,
            "n_attempts": len(self.attempts),
            "cycle_checks": self.cycle_checks,
            "gave_up": self.gave_up,
        }


# -- how an attempt is scored and counted (shared with `algorithm1` and `search_statistics`) ------
def cf_score_of(result: Any) -> int:
    """CF_Score (0..5) of a scorer result (`.score`) or of a bare number."""
    value = getattr(result, "score", result)
    return int(value)


def raw_values_of(result: Any) -> dict[str, float]:
    """The raw metric values of a scorer result (`.values`), {} when it has none."""
    values = getattr(result, "values", None)
    return {k: float(v) for k, v in values.items()} if isinstance(values, Mapping) else {}


def tie_break_key(result: Any) -> tuple[float, ...]:
    """Tie-break among equal CF_Scores: larger CPG, then lower LPIPS, higher cosine, lower L2."""
    values = raw_values_of(result)

    def get(name: str, sign: float) -> float:
        v = values.get(name, math.nan)
        return -math.inf if math.isnan(v) else sign * v

    return (get("cpg", 1.0), get("lpips", -1.0), get("clip_cosine", 1.0), get("l2", -1.0))


def unet_calls_of(maker: Any) -> int:
    """UNet evaluations per batch item so far (a batch of 8 latents counts 8)."""
    ld = getattr(maker, "ld", None)
    return int(getattr(ld, "unet_calls", getattr(maker, "unet_calls", 0)))


def unet_passes_of(maker: Any) -> int:
    """UNet forward passes so far (a batch of 8 latents counts 1): what wall time follows."""
    ld = getattr(maker, "ld", None)
    return int(getattr(ld, "unet_forward_passes", getattr(maker, "unet_forward_passes", 0)))


def score_batch(scorer: Any, factual: torch.Tensor, counterfactuals: torch.Tensor, finding: str) -> list:
    """One scorer result per counterfactual (N, 1, H, W); `scorer.score(...)` or `scorer(...)`."""
    score = getattr(scorer, "score", None)
    results = score(factual, counterfactuals, finding) if callable(score) else scorer(factual, counterfactuals, finding)
    results = list(results)
    if len(results) != counterfactuals.shape[0]:
        raise ValueError(f"scorer returned {len(results)} results for {counterfactuals.shape[0]} counterfactuals")
    return results


def fit_guidance_of(maker: Any, null_setting: Any) -> float | None:
    """The guidance a maker's inversion is fitted for (NTI's `inversion_guidance`), None when it fits none."""
    from cyclex.counterfactuals.nti import FAST_NULL_SETTINGS

    if isinstance(null_setting, str) and null_setting in FAST_NULL_SETTINGS:
        return None
    value = getattr(maker, "inversion_guidance", None)
    return None if value is None else float(value)


def as_single_image(image: torch.Tensor) -> torch.Tensor:
    """(1, H, W) or (1, 1, H, W) -> (1, 1, H, W) float; anything else fails naming the shape."""
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
    fit_null_per_guidance: makers whose inversion is fitted for a guidance (`inversion_guidance`,
        null-text inversion) are refitted at each sampling guidance, Algorithm 1's method; the
        guidances then form the outer loop (one fit serves every strength before the next fit).
        False: one fit at the maker's inversion guidance serves every guidance (cheaper, approximate).
    success_shares: {dimension: {value: share}} ordering the grid (e.g. measured on validation
        seeds); None: the paper's (`PAPER_SUCCESS_SHARES`). Used when order_by_paper_shares is True.
    early_stop: an `EarlyStopRule` (give up on findings whose first attempts score far from
        acceptance), or None (search the whole grid until accepted).
    stop_at_first_accepted: False tries every setting (a validation log of the whole grid); the
        result is still the first accepted counterfactual.
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
        fit_null_per_guidance: bool = False,
        success_shares: Mapping[str, Mapping[Any, float]] | None = None,
        early_stop: EarlyStopRule | None = None,
        stop_at_first_accepted: bool = True,
    ) -> None:
        if early_stop is not None and not isinstance(early_stop, EarlyStopRule):
            raise TypeError(f"early_stop must be an EarlyStopRule or None, got {type(early_stop).__name__}")
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
        def order(values: list, dimension: str) -> list:
            return order_by_success_share(values, dimension, success_shares) if order_by_paper_shares else values

        self.success_shares = success_shares
        self.early_stop = early_stop
        self.stop_at_first_accepted = bool(stop_at_first_accepted)
        self.null_settings = order(list(null_settings), "null_setting")
        self.checkpoints = order(list(checkpoints), "checkpoint")
        self.strengths = [float(s) for s in order(list(strengths), "strength")]
        self.guidances = [float(g) for g in order(list(guidances), "guidance")]
        self.required_score = int(required_score)
        self.guidance_batch_size = None if guidance_batch_size is None else int(guidance_batch_size)
        self.fit_null_per_guidance = bool(fit_null_per_guidance)
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

    def fitted_at(self, maker: Any, guidance: float) -> Any:
        """A sibling of `maker` whose inversion is fitted at `guidance` (sharing its model and cache)."""
        key = (id(maker), float(guidance))
        if key not in self._maker_memo:
            if not callable(getattr(maker, "replace", None)):
                raise TypeError(f"{type(maker).__name__} has inversion_guidance but no replace(); "
                                "fit_null_per_guidance needs makers that can be copied with another guidance")
            self._maker_memo[key] = maker.replace(inversion_guidance=float(guidance))
        return self._maker_memo[key]

    def _runs_for(self, maker: Any) -> list[tuple[Any, list[tuple[float, list[float]]]]]:
        """(maker to invert with, [(strength, guidances), ...]) in search order, for one (null, checkpoint)."""
        if self.fit_null_per_guidance and hasattr(maker, "inversion_guidance"):
            return [(self.fitted_at(maker, g), [(s, [g]) for s in self.strengths]) for g in self.guidances]
        return [(maker, self._strength_guidance_batches())]

    def _null_settings_for(self, checkpoint: str) -> list:
        if isinstance(self.makers, Mapping) and not hasattr(self.makers[checkpoint], "with_null_setting"):
            return [None]
        return list(self.null_settings)

    def plan(self) -> list[tuple[Any, str, Any, list[tuple[float, list[float]]]]]:
        """The search order: [(null setting, checkpoint, maker to invert with, [(strength, guidances)])].

        Each entry is one inversion; its batches are the edits that reuse it, in order.
        """
        runs = []
        for null_setting in self.null_settings:
            for checkpoint in self.checkpoints:
                effective_null = null_setting
                if self._null_settings_for(checkpoint) == [None]:
                    if null_setting != self.null_settings[0]:
                        continue  # a maker without null settings is tried once per checkpoint
                    effective_null = None
                for maker, batches in self._runs_for(self.maker_for(checkpoint, effective_null)):
                    runs.append((effective_null, checkpoint, maker, batches))
        return runs

    def planned_settings(self) -> list[tuple[Any, str, float | None, list[tuple[float, list[float]]]]]:
        """`plan()` without makers: [(null setting, checkpoint, fit guidance, [(strength, guidances)])].

        fit guidance: the guidance a null-text fit is made for (None for the optimisation-free
        inversions). `search_statistics.replay_search` replays a whole-grid log in this order.
        """
        return [(null, checkpoint, fit_guidance_of(maker, null), batches)
                for null, checkpoint, maker, batches in self.plan()]

    # -- one finding ---------------------------------------------------------------------------
    def search(self, image: torch.Tensor, source_prompt: str, target_prompt: str, finding: str) -> SearchResult:
        """image (1, H, W) or (1, 1, H, W) in [0, 1] -> the accepted (or best) counterfactual."""
        factual = as_single_image(image)
        size = tuple(factual.shape[-2:])
        start_time = time.perf_counter()
        attempts: list[dict[str, Any]] = []
        best: tuple | None = None
        first_accepted: tuple | None = None
        total_calls = 0
        passes_start = {}
        rule_checked = self.early_stop is None
        gave_up = False
        for effective_null, checkpoint, maker, batches in self.plan():
            passes_start.setdefault(id(getattr(maker, "ld", maker)), (maker, unet_passes_of(maker)))
            fit_guidance = fit_guidance_of(maker, effective_null)
            t0, c0 = time.perf_counter(), unet_calls_of(maker)
            inversion = maker.invert(factual, [source_prompt])
            pending_calls, pending_seconds = unet_calls_of(maker) - c0, time.perf_counter() - t0
            for strength, guidances in batches:
                t1, c1 = time.perf_counter(), unet_calls_of(maker)
                images = maker.edit(inversion, [target_prompt], guidances=guidances, strength=strength,
                                    output_size=size)[0]
                edit_calls = unet_calls_of(maker) - c1
                calls = edit_calls + pending_calls
                seconds = time.perf_counter() - t1 + pending_seconds
                settings = [
                    {"null_setting": effective_null, "checkpoint": checkpoint, "strength": strength,
                     "guidance": g, "fit_guidance": fit_guidance, "edit_unet_calls": edit_calls / len(guidances),
                     "inversion_unet_calls": pending_calls if k == 0 else 0}
                    for k, g in enumerate(guidances)
                ]
                pending_calls, pending_seconds = 0, 0.0
                group, accepted_index = self._judge(factual, images, finding, settings, calls, seconds,
                                                    first_accepted is None)
                attempts.extend(group)
                total_calls += calls
                for k, attempt in enumerate(group):
                    candidate = (attempt["score"], attempt["verified"] is True, tie_break_key(attempt["_result"]))
                    if best is None or candidate > best[0]:
                        best = (candidate, images[k], attempt)
                if accepted_index is not None and first_accepted is None:
                    first_accepted = (images[accepted_index], group[accepted_index])
                    if self.stop_at_first_accepted:
                        break
                if not rule_checked and len(attempts) >= self.early_stop.after_attempts:
                    rule_checked = True
                    if first_accepted is None and self.early_stop.gives_up(attempts):
                        gave_up = True
                        break
            if gave_up or (first_accepted is not None and self.stop_at_first_accepted):
                break
        assert best is not None  # every loop ran at least once (checked in __init__)
        passes = sum(unet_passes_of(m) - p for m, p in passes_start.values())
        image, attempt = (first_accepted if first_accepted is not None else (best[1], best[2]))
        return self._finish(image, attempt, attempts, finding, total_calls, start_time,
                            accepted=first_accepted is not None, passes=passes, gave_up=gave_up)

    def _strength_guidance_batches(self) -> list[tuple[float, list[float]]]:
        """(strength, guidances) in search order: each strength's guidances in batches of guidance_batch_size."""
        size = self.guidance_batch_size or len(self.guidances)
        return [(strength, self.guidances[i:i + size])
                for strength in self.strengths for i in range(0, len(self.guidances), size)]

    def _judge(self, factual, images, finding, settings, calls, seconds, may_accept=True):
        """Score a guidance batch (cheap), cycle-check the passing ones (one generator call).

        may_accept: False once an earlier batch was accepted (a whole-grid validation run): the
        attempts still record whether they meet acceptance (`meets_acceptance`), none is `accepted`.
        """
        t0 = time.perf_counter()
        results = score_batch(self.scorer, factual.expand(images.shape[0], -1, -1, -1), images, finding)
        passing = [k for k, r in enumerate(results) if cf_score_of(r) >= self.required_score]
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
            meets = verified.get(k) is True
            ok = meets and may_accept and accepted_index is None
            if ok:
                accepted_index = k
            group.append({
                **settings[k],
                "score": cf_score_of(result),
                "failed": list(getattr(result, "failed", [])),
                "values": raw_values_of(result),
                "verified": verified.get(k),
                "accepted": ok,
                "meets_acceptance": meets,
                "unet_calls": calls / n,
                "seconds": (seconds + judge_seconds) / n,
                "_result": result,
            })
        return group, accepted_index

    def _finish(self, image, attempt, attempts, finding, total_calls, start_time, accepted, passes=0,
                gave_up=False) -> SearchResult:
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
            gave_up=bool(gave_up),
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
