"""benchmarks/demo_guidance.py: the rule that picks the demo's omega, and the demo using its pick."""

import json
from pathlib import Path


def _generators(clean_auc, clean_rate=0.9, shortcut_rate=0.9, shortcut_overlap=0.9, clean_overlap=0.0):
    return {
        "clean": {"cyclic_rate": clean_rate, "pixel_auc_positive_diff": clean_auc,
                  "pixel_auc_positive_diff_raw": clean_auc, "shortcut_marker_overlap_rate": clean_overlap},
        "shortcut": {"cyclic_rate": shortcut_rate, "pixel_auc_positive_diff": 0.5,
                     "pixel_auc_positive_diff_raw": 0.5, "shortcut_marker_overlap_rate": shortcut_overlap},
    }


def test_other_goals_ignore_the_pixel_auc_and_check_the_rest():
    from benchmarks.demo_guidance import meets_other_goals

    assert meets_other_goals(_generators(clean_auc=0.1))  # a low AUC alone does not disqualify
    assert not meets_other_goals(_generators(0.9, clean_rate=0.69))
    assert not meets_other_goals(_generators(0.9, shortcut_rate=0.5))
    assert not meets_other_goals(_generators(0.9, shortcut_overlap=0.79))
    assert not meets_other_goals(_generators(0.9, clean_overlap=0.11))


def test_choice_is_the_best_clean_auc_among_eligible_omegas():
    from benchmarks.demo_guidance import choose_guidance, meets_other_goals

    candidates = {"1": _generators(0.95, shortcut_overlap=0.5),  # best AUC but the marker is not found: out
                  "2": _generators(0.88), "3": _generators(0.86), "7.5": _generators(0.80)}
    sweep = {omega: {"generators": g, "meets_other_goals": meets_other_goals(g)} for omega, g in candidates.items()}
    assert choose_guidance(sweep) == 2.0
    for omega in sweep:
        sweep[omega]["meets_other_goals"] = False
    assert choose_guidance(sweep) is None


def test_the_demo_runs_at_the_committed_choice():
    from benchmarks.demo_guidance import RESULTS, choose_guidance
    from cyclex.demo.run_demo import DEMO_GUIDANCE

    result = json.loads(Path(RESULTS).read_text())
    assert choose_guidance(result["sweep"]) == result["chosen_guidance"]  # the file follows its own rule
    assert DEMO_GUIDANCE == result["chosen_guidance"]
