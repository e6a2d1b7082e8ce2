"""Issue 23's search levers with fake makers whose answers are known: early stop, measured order,
whole-grid validation logs, and the replay that fits rules from them."""

from __future__ import annotations

import pytest

from cyclex.counterfactuals.search import EarlyStopRule, order_by_success_share
from cyclex.counterfactuals.search_statistics import (
    fit_early_stop_rule,
    measured_success_shares,
    replay_search,
)
from tests.test_search import FINDING, IMAGE, build


def test_early_stop_gives_up_when_the_first_attempts_score_low():
    # every candidate scores 3 (the table's default): after 2 attempts below 4 the search gives up
    search, events, _, cycle = build({}, set(), guidance_batch_size=1, early_stop=EarlyStopRule(2, 4))
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert result.gave_up and not result.accepted
    assert len(result.attempts) == 2 and len([e for e in events if e[0] == "edit"]) == 2
    assert result.unet_calls == 10 + 2 * 2
    assert cycle.seen == [] and result.cycle_checks == 0
    assert result.summary()["gave_up"] is True


def test_early_stop_keeps_searching_when_an_early_attempt_is_close():
    close = ("default", "best_l2", 1.0, 8.0)  # second attempt, score 4: not far from acceptance
    target = ("default", "best_l2", 0.8, 7.0)
    search, _, _, cycle = build({close: (4, 0.0), target: (5, 1.0)}, {target}, guidance_batch_size=1,
                                early_stop=EarlyStopRule(2, 4))
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert result.accepted and not result.gave_up
    assert result.setting["strength"] == 0.8 and result.setting["guidance"] == 7.0
    assert cycle.seen == [target] and result.cycle_checks == 1


def test_early_stop_rule_checks_its_arguments():
    with pytest.raises(ValueError, match="after_attempts"):
        EarlyStopRule(0, 3)
    with pytest.raises(ValueError, match="below_score"):
        EarlyStopRule(1, 6)
    with pytest.raises(ValueError, match="lacks"):
        EarlyStopRule.from_dict({"after_attempts": 2})
    rule = EarlyStopRule(3, 2, "validation seeds [[1, 2]]")
    assert EarlyStopRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(TypeError, match="EarlyStopRule"):
        build({}, set(), early_stop={"after_attempts": 1, "below_score": 2})


def test_whole_grid_run_tries_everything_and_returns_the_first_accepted():
    first = ("default", "best_l2", 1.0, 9.0)
    second = ("underfit", "best_l1", 0.8, 7.0)
    search, _, _, cycle = build({first: (5, 0.1), second: (5, 0.9)}, {first, second}, stop_at_first_accepted=False)
    result = search.search(IMAGE, "src", "tgt", FINDING)
    assert result.accepted and result.setting["guidance"] == 9.0 and result.setting["null_setting"] == "default"
    assert len(result.attempts) == 2 * 2 * 3 * 4  # the whole grid
    assert [a["accepted"] for a in result.attempts].count(True) == 1  # only the returned one is `accepted`
    assert sum(a["meets_acceptance"] for a in result.attempts) == 2
    assert set(cycle.seen) == {first, second}


def test_measured_shares_order_the_grid():
    shares = {"strength": {"0.8": 0.7, "1.0": 0.2}, "guidance": {"10.0": 0.9, "7.0": 0.1}}
    assert order_by_success_share([1.0, 0.9, 0.8], "strength", shares) == [0.8, 1.0, 0.9]
    assert order_by_success_share([7, 10], "guidance", shares) == [10, 7]
    assert order_by_success_share([7, 10], "guidance") == [7, 10]  # the paper's: omega 7 first
    search, events, _, _ = build({}, set(), strengths=(1.0, 0.8), guidances=(7, 10), success_shares=shares,
                                 null_settings=("default",), checkpoints=("best_l2",))
    search.search(IMAGE, "src", "tgt", FINDING)
    assert [e[3:] for e in events if e[0] == "edit"] == [(0.8, (10.0, 7.0)), (1.0, (10.0, 7.0))]


def whole_grid_logs(tables, **kwargs):
    """One whole-grid log per {setting: (score, cpg)} table; a setting scoring 5 is verified."""
    logs = []
    for table in tables:
        search, _, _, _ = build(table, {k for k, (score, _) in table.items() if score == 5},
                                stop_at_first_accepted=False, **kwargs)
        logs.append(search.search(IMAGE, "src", "tgt", FINDING).attempts)
    return logs


def test_replay_reproduces_what_the_search_accepts_and_tries():
    grid = {"strengths": (1.0, 0.8), "guidances": (7, 10), "guidance_batch_size": 1}
    tables = [
        {("default", "best_l1", 0.8, 10.0): (5, 1.0)},  # rescued by the 8th of 16 settings only
        {("default", "best_l2", 1.0, 10.0): (5, 1.0)},  # rescued early
        {},  # never rescued: every attempt scores 3
        {("default", "best_l2", 1.0, 7.0): (4, 0.0), ("default", "best_l2", 0.8, 7.0): (5, 1.0)},
    ]
    logs = whole_grid_logs(tables, **grid)
    rule = EarlyStopRule(2, 4)
    for early_stop in (None, rule):
        replayed = replay_search(build({}, set(), early_stop=early_stop, **grid)[0].planned_settings(), logs,
                                 image_ids=list(range(len(logs))), early_stop=early_stop)
        for table, row in zip(tables, replayed, strict=True):
            search, _, _, _ = build(table, {k for k, (s, _) in table.items() if s == 5}, early_stop=early_stop, **grid)
            real = search.search(IMAGE, "src", "tgt", FINDING)
            assert (row["accepted"], row["n_attempts"], row["gave_up"]) == (real.accepted, len(real.attempts),
                                                                           real.gave_up)
    # stopping after 1 or 2 attempts below CF_Score 4 or 5 loses finding 0; after 8 only finding 2 (never
    # rescued) stops, so that rule saves UNet work without losing an acceptance
    fitted = fit_early_stop_rule(build({}, set(), **grid)[0].planned_settings(), logs, list(range(4)),
                                 after_attempts=(1, 2, 8), below_scores=(4, 5))
    assert fitted["without_rule"]["accepted"] == 3
    chosen = fitted["rule"]
    assert chosen is not None and chosen.after_attempts == 8 and chosen.below_score == 4
    assert all(c["findings_lost"] >= 1 for c in fitted["candidates"] if c["after_attempts"] < 8)
    shares = measured_success_shares(logs)
    assert shares["null_setting"] == {"default": 1.0, "underfit": 0.0}
    assert shares["checkpoint"] == {"best_l1": pytest.approx(1 / 3), "best_l2": pytest.approx(2 / 3)}
    assert shares["guidance"] == {"10.0": pytest.approx(2 / 3), "7.0": pytest.approx(1 / 3)}
    assert shares["strength"] == {"0.8": pytest.approx(2 / 3), "1.0": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="one image id per log"):
        replay_search([], logs, [0])


def test_replay_refuses_a_plan_outside_the_logged_grid():
    logs = whole_grid_logs([{}], strengths=(1.0,), guidances=(7,))
    plan = build({}, set(), strengths=(0.8,), guidances=(7,))[0].planned_settings()
    with pytest.raises(KeyError, match="no attempt"):
        replay_search(plan, logs, [0])
