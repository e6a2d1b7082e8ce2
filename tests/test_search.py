"""Metric-guided search logic with fake makers / scorers whose answers are known."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from cyclex.counterfactuals.algorithm1 import algorithm1_search
from cyclex.counterfactuals.search import MetricGuidedSearch, order_by_success_share
from cyclex.counterfactuals.search_statistics import (
    SearchSummary,
    ablation_tables,
    bootstrap_mean_ci,
    paired_difference_ci,
    paired_ratio_ci,
)
from cyclex.explain.cf_threshold_calibration import (
    calibrate_cf_thresholds,
    load_cf_thresholds,
    save_cf_thresholds,
)
from cyclex.explain.scores import CFThresholds, CounterfactualScore, cf_score

FINDING = "Cardiomegaly"
SIZE = (8, 8)


class SettingCodes:
    """Each fake counterfactual is a constant image whose value names the setting that made it."""

    def __init__(self) -> None:
        self.settings: list[tuple] = []

    def encode(self, setting: tuple) -> float:
        self.settings.append(setting)
        return len(self.settings) / 10_000.0

    def decode(self, image: torch.Tensor) -> tuple:
        return self.settings[int(round(float(image.mean()) * 10_000)) - 1]


class FakeMaker:
    """invert costs 10 UNet calls, edit 2 per guidance; answers are constant images."""

    def __init__(self, checkpoint: str, codes: SettingCodes, events: list, null_setting="default") -> None:
        self.checkpoint, self.codes, self.events, self.null_setting = checkpoint, codes, events, null_setting
        self.unet_calls = 0
        self.unet_forward_passes = 0
        self.inversion_guidance = 7.5
        self.cache = None

    def with_null_setting(self, null_setting):
        sibling = FakeMaker(self.checkpoint, self.codes, self.events, null_setting)
        return sibling

    def replace(self, **changes):
        clone = copy.copy(self)
        for k, v in changes.items():
            setattr(clone, k, v)
        return clone

    def invert(self, images, prompts):
        self.unet_calls += 10
        self.unet_forward_passes += 3
        self.events.append(("invert", self.null_setting, self.checkpoint, self.inversion_guidance))
        return {"n": images.shape[0]}

    def edit(self, inversion, targets, guidances, strength, output_size):
        self.unet_calls += 2 * len(guidances)
        self.unet_forward_passes += 1  # the guidances run as one batch
        self.events.append(("edit", self.null_setting, self.checkpoint, strength, tuple(guidances)))
        values = [self.codes.encode((self.null_setting, self.checkpoint, float(strength), float(g))) for g in guidances]
        return torch.stack([torch.full((1, *output_size), v) for v in values]).unsqueeze(0)


class TableScorer:
    """CF_Score from a table {setting: (score, cpg)}; default (3, 0.0)."""

    def __init__(self, codes: SettingCodes, table: dict) -> None:
        self.codes, self.table, self.calls = codes, table, 0

    def score(self, factual, counterfactuals, finding):
        self.calls += 1
        results = []
        for image in counterfactuals:
            score, cpg = self.table.get(self.codes.decode(image), (3, 0.0))
            passed = {name: i < score for i, name in enumerate(("lpips", "clip", "l2", "cpg", "fet"))}
            results.append(CounterfactualScore(score=score, passed=passed, failed=[k for k, v in passed.items() if not v],
                                               values={"cpg": cpg, "lpips": 0.1}))
        return results


class CycleOracle:
    def __init__(self, codes: SettingCodes, verified: set) -> None:
        self.codes, self.verified, self.seen = codes, verified, []

    def __call__(self, images, findings):
        settings = [self.codes.decode(image) for image in images]
        self.seen.extend(settings)
        assert list(findings) == [FINDING] * len(settings)
        return [s in self.verified for s in settings]


def build(table, verified, **kwargs):
    kwargs.setdefault("null_settings", ("default", "underfit"))  # the paper's H_null
    codes, events = SettingCodes(), []
    makers = {c: FakeMaker(c, codes, events) for c in ("best_l2", "best_l1")}
    scorer = TableScorer(codes, table)
    cycle = CycleOracle(codes, verified)
    return MetricGuidedSearch(makers, scorer, cycle, **kwargs), events, scorer, cycle


IMAGE = torch.zeros(1, *SIZE)


def test_stops_at_first_accepted_setting_in_paper_order():
    target = ("default", "best_l2", 0.8, 9.0)
    also_good = ("underfit", "best_l1", 1.0, 7.0)
    search, events, _, cycle = build({target: (5, 0.5), also_good: (5, 0.9)}, {target, also_good})
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert result.accepted and result.verified is True
    assert result.setting == dict(zip(("null_setting", "checkpoint", "strength", "guidance"), target, strict=True))
    # Order: delta 1.0 then 0.8 (paper shares 40 % > 34 % > 25 %); omega 7 first in each batch.
    assert [e for e in events if e[0] == "edit"] == [
        ("edit", "default", "best_l2", 1.0, (7.0, 8.0, 9.0, 10.0)),
        ("edit", "default", "best_l2", 0.8, (7.0, 8.0, 9.0, 10.0)),
    ]
    assert [e for e in events if e[0] == "invert"] == [("invert", "default", "best_l2", 7.5)]  # one inversion
    assert len(result.attempts) == 8
    assert result.unet_calls == 10 + 2 * 4 * 2
    assert result.unet_passes == 3 + 2
    assert cycle.seen == [target]  # the generator only saw the candidate passing CF_Score
    assert float(result.image.mean()) == pytest.approx(search.scorer.codes.settings.index(target) / 1e4 + 1e-4)
    json.dumps(result.attempts)  # the log is JSON-ready


def test_unverified_high_score_is_not_accepted_and_search_moves_on():
    unverified = ("default", "best_l2", 1.0, 7.0)
    later = ("default", "best_l1", 1.0, 10.0)
    search, events, _, cycle = build({unverified: (5, 1.0), later: (5, 0.1)}, {later})
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert result.accepted and result.setting["checkpoint"] == "best_l1" and result.setting["guidance"] == 10.0
    assert cycle.seen == [unverified, later]
    assert [a["verified"] for a in result.attempts if a["score"] == 5] == [False, True]
    assert len([e for e in events if e[0] == "invert"]) == 2


def test_reports_the_best_when_nothing_is_accepted():
    best = ("underfit", "best_l1", 0.9, 8.0)
    runner_up = ("default", "best_l2", 1.0, 7.0)
    tie_lower_cpg = ("default", "best_l1", 0.8, 10.0)
    table = {best: (4, 0.9), tie_lower_cpg: (4, 0.2), runner_up: (3, 5.0)}
    search, events, _, cycle = build(table, set())
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert not result.accepted
    assert result.setting == dict(zip(("null_setting", "checkpoint", "strength", "guidance"), best, strict=True))
    assert len(result.attempts) == 2 * 2 * 3 * 4
    assert len([e for e in events if e[0] == "invert"]) == 4  # one per (null setting, checkpoint)
    assert cycle.seen == []  # no candidate reached CF_Score 5
    assert result.unet_calls == 4 * 10 + 12 * 2 * 4


def test_required_score_is_configurable_and_order_can_be_kept():
    first = ("default", "best_l2", 1.0, 10.0)
    search, events, _, _ = build({first: (4, 0.0)}, {first}, required_score=4, guidances=(10, 9),
                                 strengths=(1.0,), order_by_paper_shares=False)
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert result.accepted and result.setting["guidance"] == 10.0
    assert events[1] == ("edit", "default", "best_l2", 1.0, (10.0, 9.0))


def test_algorithm1_reinverts_at_every_setting():
    target = ("default", "best_l2", 0.9, 8.0)
    codes, events = SettingCodes(), []
    makers = {c: FakeMaker(c, codes, events) for c in ("best_l2", "best_l1")}
    result = algorithm1_search(makers, TableScorer(codes, {target: (5, 1.0)}), CycleOracle(codes, {target}),
                               IMAGE, "src", "tgt", FINDING)
    assert result.accepted and result.setting["strength"] == 0.9 and result.setting["guidance"] == 8.0
    inversions = [e for e in events if e[0] == "invert"]
    assert len(inversions) == len(result.attempts) == 4 + 2  # delta 1.0 x 4 omegas, then 0.9 x (7, 8)
    assert [e[3] for e in inversions] == [7.0, 8.0, 9.0, 10.0, 7.0, 8.0]  # NTI fitted at the sampling omega
    assert result.unet_calls == 6 * (10 + 2)
    assert result.unet_passes == 6 * (3 + 1)


def test_ablation_tables_count_by_hand():
    logs = [
        [
            {"null_setting": "default", "checkpoint": "best_l2", "strength": 1.0, "guidance": 7.0, "score": 5, "accepted": True},
        ],
        [
            {"null_setting": "default", "checkpoint": "best_l2", "strength": 1.0, "guidance": 7.0, "score": 5, "accepted": False},
            {"null_setting": "default", "checkpoint": "best_l1", "strength": 0.8, "guidance": 8.0, "score": 5, "accepted": True},
        ],
        [
            {"null_setting": "underfit", "checkpoint": "best_l1", "strength": 0.8, "guidance": 8.0, "score": 2, "accepted": False},
        ],
    ]
    tables = ablation_tables(logs)
    assert tables["n_findings"] == 3 and tables["n_accepted"] == 2
    cell = tables["by_strength_guidance"]["delta=1|omega=7"]
    assert cell == {"attempts": 2, "score_passed": 2, "accepted": 1, "share_of_accepted": 0.5}
    assert tables["by_strength_guidance"]["delta=0.8|omega=8"]["attempts"] == 2
    assert tables["by_checkpoint"]["best_l1"] == {"attempts": 2, "score_passed": 1, "accepted": 1, "share_of_accepted": 0.5}
    assert tables["by_null_setting"]["underfit"]["accepted"] == 0


def test_summary_and_order_helpers():
    assert order_by_success_share([0.9, 1.0, 0.8], "strength") == [1.0, 0.8, 0.9]
    assert order_by_success_share([10, 9, 8, 7], "guidance") == [7, 10, 9, 8]
    assert order_by_success_share(["best_l1", "best_l2"], "checkpoint") == ["best_l2", "best_l1"]
    first = ("default", "best_l2", 1.0, 7.0)
    search, _, _, _ = build({first: (5, 1.0)}, {first})
    results = [search.search(IMAGE, "s", "t", FINDING)]
    search_fail, _, _, _ = build({}, set())
    results.append(search_fail.search(IMAGE, "s", "t", FINDING))
    summary = SearchSummary.from_results(results)
    assert summary.acceptance_rate == 0.5 and summary.n_accepted == 1
    assert summary.unet_calls_per_accepted == (10 + 8) + (40 + 96)


def test_calibrated_thresholds_match_numpy_quantiles(tmp_path):
    rng = np.random.default_rng(0)
    values = {k: rng.uniform(0.0, 1.0, 50) for k in ("lpips", "clip_cosine", "l2", "cpg", "fet")}
    t = calibrate_cf_thresholds(values, coverage=0.9)
    assert t.lpips == pytest.approx(np.quantile(values["lpips"], 0.9))
    assert t.clip == pytest.approx(np.quantile(values["clip_cosine"], 0.1))
    assert t.cpg == pytest.approx(max(0.1, np.quantile(values["cpg"], 0.1)))
    admitted = [cf_score(*(values[k][i] for k in ("lpips", "clip_cosine", "l2", "cpg", "fet")), thresholds=t).passed["lpips"]
                for i in range(50)]
    assert 0.85 <= np.mean(admitted) <= 0.95
    path = save_cf_thresholds(tmp_path / "cf_thresholds.json", t, {"n": 50, "coverage": 0.9})
    assert load_cf_thresholds(path) == t
    (tmp_path / "bad.json").write_text(json.dumps({"thresholds": {"lpipz": 0.1}}))
    with pytest.raises(ValueError, match="lpipz"):
        load_cf_thresholds(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="needs values"):
        calibrate_cf_thresholds({"lpips": [0.1]})
    assert CFThresholds().lpips == 0.2  # real weights keep Table 2


def test_bad_configuration_is_rejected():
    codes = SettingCodes()
    with pytest.raises(KeyError, match="best_l1"):
        MetricGuidedSearch({"best_l2": FakeMaker("best_l2", codes, [])}, None, None)
    with pytest.raises(ValueError, match="guidances"):
        MetricGuidedSearch(lambda c, n: None, None, None, guidances=())


def test_guidance_batches_stop_at_the_first_accepted_guidance():
    """guidance_batch_size=1: omega 7 alone first; an accepted omega 7 costs one guidance's sampling."""
    first = ("default", "best_l2", 1.0, 7.0)
    batched, events_b, _, _ = build({first: (5, 1.0)}, {first})
    single, events_s, _, _ = build({first: (5, 1.0)}, {first}, guidance_batch_size=1)
    result_b = batched.search(IMAGE, "s", "t", FINDING)
    result_s = single.search(IMAGE, "s", "t", FINDING)
    assert result_b.setting == result_s.setting == dict(zip(("null_setting", "checkpoint", "strength", "guidance"),
                                                            first, strict=True))
    assert [e for e in events_s if e[0] == "edit"] == [("edit", "default", "best_l2", 1.0, (7.0,))]
    assert result_s.unet_calls == 10 + 2 and result_b.unet_calls == 10 + 2 * 4
    assert len(result_s.attempts) == 1 and len(result_b.attempts) == 4
    # batches of 3 keep the paper order and cover every guidance once per strength
    triple, events_t, _, _ = build({}, set(), guidance_batch_size=3, strengths=(1.0,), null_settings=("default",),
                                   checkpoints=("best_l2",))
    triple.search(IMAGE, "s", "t", FINDING)
    assert [e[4] for e in events_t if e[0] == "edit"] == [(7.0, 8.0, 9.0), (10.0,)]
    with pytest.raises(ValueError, match="guidance_batch_size"):
        build({}, set(), guidance_batch_size=0)


def test_optimisation_free_null_settings_are_tried_first():
    assert order_by_success_share(["underfit", "default", "negative-prompt"], "null_setting") == [
        "negative-prompt", "default", "underfit"]
    assert order_by_success_share(["default", "direct"], "null_setting") == ["direct", "default"]
    cheap = ("negative-prompt", "best_l2", 1.0, 7.0)
    search, events, _, _ = build({cheap: (5, 1.0)}, {cheap}, null_settings=("default", "underfit", "negative-prompt"))
    result = search.search(IMAGE, "s", "t", FINDING)
    assert result.setting["null_setting"] == "negative-prompt"
    assert [e[1] for e in events if e[0] == "invert"] == ["negative-prompt"]  # NTI never fitted


def test_ablation_tables_count_failed_criteria():
    logs = [[{"null_setting": "default", "checkpoint": "best_l2", "strength": 1.0, "guidance": 7.0, "score": 3,
              "failed": ["lpips", "cpg"], "accepted": False},
             {"null_setting": "default", "checkpoint": "best_l2", "strength": 1.0, "guidance": 8.0, "score": 4,
              "failed": ["lpips"], "accepted": False}]]
    assert ablation_tables(logs, required_score=4)["failed_criteria"] == {"cpg": 1, "lpips": 2}
    assert ablation_tables(logs, required_score=4)["by_strength_guidance"]["delta=1|omega=8"]["score_passed"] == 1


def test_fit_null_per_guidance_refits_at_each_guidance_and_shares_strengths():
    """Algorithm 1's method (one null-text fit per guidance), one fit per guidance for all strengths."""
    search, events, _, _ = build({}, set(), fit_null_per_guidance=True)
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert not result.accepted and len(result.attempts) == 2 * 2 * 3 * 4  # the whole grid, as Algorithm 1
    inversions = [e for e in events if e[0] == "invert"]
    assert len(inversions) == 2 * 2 * 4  # (null, checkpoint, guidance): Algorithm 1 inverts 48 times
    assert [e[3] for e in inversions[:4]] == [7.0, 8.0, 9.0, 10.0]  # fitted at the sampling guidance, omega 7 first
    edits = [e for e in events if e[0] == "edit"]
    assert edits[:3] == [("edit", "default", "best_l2", s, (7.0,)) for s in (1.0, 0.8, 0.9)]  # omega outer
    assert result.unet_calls == 16 * 10 + 48 * 2


def test_fit_null_per_guidance_stops_before_fitting_the_next_guidance():
    target = ("default", "best_l2", 0.8, 7.0)
    search, events, _, _ = build({target: (5, 1.0)}, {target}, fit_null_per_guidance=True)
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert result.accepted and result.setting["strength"] == 0.8 and result.setting["guidance"] == 7.0
    assert [e[3] for e in events if e[0] == "invert"] == [7.0]  # one fit served delta 1.0 and 0.8
    assert result.unet_calls == 10 + 2 * 2


def test_same_grid_search_makes_algorithm1s_counterfactuals_with_real_null_text_inversion():
    """Tiny SD, real NTI: every setting the search tries scores exactly as Algorithm 1's re-inversion."""
    from cyclex.counterfactuals.inversion_cache import InversionCache
    from cyclex.counterfactuals.nti import NullTextInversionMaker
    from cyclex.demo.tiny_sd import TinySDConfig, tiny_sd_pipeline

    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(TinySDConfig(seed=0))
    image = torch.rand(1, 32, 32)

    class ValueScorer:  # CF_Score 3 for everything; the raw value is the image mean (a fingerprint)
        def score(self, factual, counterfactuals, finding):
            return [CounterfactualScore(score=3, passed={}, failed=["cpg"], values={"mean": float(c.mean())})
                    for c in counterfactuals]

    def makers():
        return {"best_l2": NullTextInversionMaker(pipe, 2, checkpoint="best_l2", cache=InversionCache(),
                                                  inversion_guidance=7.0)}

    grid = {"null_settings": ((1, 1e-5),), "checkpoints": ("best_l2",), "strengths": (1.0, 0.5),
            "guidances": (7.0, 9.0)}
    never = lambda images, findings: [False] * len(findings)  # noqa: E731
    searched = MetricGuidedSearch(makers(), ValueScorer(), never, fit_null_per_guidance=True, **grid).search(
        image, "src", "tgt", FINDING)
    written = algorithm1_search(makers(), ValueScorer(), never, image, "src", "tgt", FINDING, **grid)

    def by_setting(result):
        return {(json.dumps(a["null_setting"]), a["strength"], a["guidance"]): a["values"]["mean"]
                for a in result.attempts}

    assert by_setting(searched) == by_setting(written) and len(by_setting(written)) == 4
    assert searched.unet_calls < written.unet_calls  # shared pivot and fits, nothing else


def test_bootstrap_intervals_by_hand():
    assert bootstrap_mean_ci([1.0] * 7) == [1.0, 1.0]
    values = [1, 0, 0, 1, 1, 0, 0, 0, 1, 0]
    rng = np.random.default_rng(3)  # the same draws as the function's: (resamples, n) integers
    idx = rng.integers(0, len(values), size=(500, len(values)))
    expected = np.percentile(np.asarray(values, float)[idx].mean(axis=1), [2.5, 97.5])
    assert bootstrap_mean_ci(values, resamples=500, seed=3) == pytest.approx(list(expected))
    low, high = bootstrap_mean_ci(values)
    assert low < 0.4 < high and bootstrap_mean_ci(values) == [low, high]  # fixed seed: reproducible
    with pytest.raises(ValueError, match="at least one finding"):
        bootstrap_mean_ci([])


def test_paired_difference_keeps_the_pairs():
    a = [1, 1, 0, 0, 1, 0, 1, 1]
    same = paired_difference_ci(a, a)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]  # paired: identical arms never differ
    b = [1, 0, 0, 0, 1, 0, 0, 1]  # a accepts two findings b misses, b none that a misses
    d = paired_difference_ci(a, b)
    assert d["difference"] == pytest.approx(0.25) and d["n_a_only"] == 2 and d["n_b_only"] == 0
    assert d["ci95"][0] >= 0.0  # every resample: a - b >= 0 on each finding
    with pytest.raises(ValueError, match="one value per finding"):
        paired_difference_ci([1, 0], [1])
    r = paired_ratio_ci([1, 2, 3], [2, 4, 6])
    assert r["ratio"] == pytest.approx(0.5) and r["ci95"] == pytest.approx([0.5, 0.5])
    assert paired_ratio_ci([1, 2], [0, 0])["ratio"] is None
