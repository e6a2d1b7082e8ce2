"""Seed 000's Algorithm 1 as written: the baseline `MetricGuidedSearch` is measured against.

For each null-text setting H_null, checkpoint, denoising strength delta and guidance omega, in the
given order, Algorithm 1 inverts the image again (a fresh inversion cache; null-text inversion
fitted at the sampling omega), samples the counterfactual, scores it (CF_Score) and keeps the first
one that reaches the required score; cyclex also asks for the cycle to be verified, as
`MetricGuidedSearch` does, so both accept by the same rule. `benchmarks/search.py` runs it as the
`algorithm1` arm (and, with a one-setting grid, as the `single_pass` arm).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cyclex.counterfactuals.inversion_cache import InversionCache
from cyclex.counterfactuals.search import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_GUIDANCES,
    DEFAULT_STRENGTHS,
    CycleCheck,
    SearchResult,
    as_single_image,
    cf_score_of,
    raw_values_of,
    score_batch,
    tie_break_key,
    unet_calls_of,
    unet_passes_of,
)

__all__ = ["algorithm1_search", "evaluate_setting"]


def evaluate_setting(
    maker: Any, scorer: Any, cycle_check: CycleCheck, image: torch.Tensor, source_prompt: str, target_prompt: str,
    finding: str, strength: float, guidance: float, required_score: int = 5, extra: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Invert + sample one setting, score it, cycle-check it when it passes CF_Score.

    Returns (image (1, H, W), attempt dict with score, verified, accepted, unet_calls, seconds).
    """
    factual = as_single_image(image)
    t0, c0, p0 = time.perf_counter(), unet_calls_of(maker), unet_passes_of(maker)
    inversion = maker.invert(factual, [source_prompt])
    cf = maker.edit(inversion, [target_prompt], guidances=[guidance], strength=strength,
                    output_size=tuple(factual.shape[-2:]))[0]
    calls = unet_calls_of(maker) - c0
    result = score_batch(scorer, factual, cf, finding)[0]
    verified = None
    if cf_score_of(result) >= required_score:
        verified = bool(list(cycle_check(cf, [finding]))[0])
    attempt = {
        **(extra or {}),
        "strength": float(strength),
        "guidance": float(guidance),
        "score": cf_score_of(result),
        "failed": list(getattr(result, "failed", [])),
        "values": raw_values_of(result),
        "verified": verified,
        "accepted": verified is True,
        "unet_calls": calls,
        "unet_passes": unet_passes_of(maker) - p0,
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
                    key = (attempt["score"], attempt["verified"] is True, tie_break_key(attempt["_result"]))
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
