"""cyclex audit: interval arithmetic worked out on paper, the shortcut test on hand-made maps, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.cycle.audit import (
    SHORTCUT_THRESHOLD,
    item_evidence,
    newcombe_difference_interval,
    shortcut_evidence,
    wilson_interval,
)


def test_wilson_interval_known_values():
    # Newcombe (1998) Table I: 81/263 -> 0.2553 to 0.3662; 0/10 -> 0 to 0.2775
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="k must lie in"):
        wilson_interval(5, 3)


def test_newcombe_difference_known_values():
    # Newcombe (1998) Table II, method 10: 56/70 - 48/80 = 0.2 -> 0.0524 to 0.3339 (p2 - p1 with the first as p1)
    low, high = newcombe_difference_interval(48, 80, 56, 70)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    assert newcombe_difference_interval(1, 2, 0, 0) is None


def _map(peak, shape=(64, 64), value=1.0):
    m = np.zeros(shape)
    x, y = peak
    m[y - 2:y + 3, x - 2:x + 3] = value
    return m


CHEST = (8, 10, 58, 50)


def test_item_evidence_masses_and_peak():
    outside = item_evidence(_map((4, 4)), "Cardiomegaly", CHEST)
    assert outside["outside_chest_mass"] == pytest.approx(1.0, abs=0.05)
    assert outside["outside_prior_mass"] == pytest.approx(1.0)
    assert outside["peak_outside_prior"] and outside["peak"] == [4, 4]
    heart = item_evidence(_map((40, 40)), "Cardiomegaly", CHEST)
    assert heart["outside_chest_mass"] == 0.0 and not heart["peak_outside_prior"]
    assert item_evidence(np.zeros((64, 64)), "Cardiomegaly", CHEST)["outside_prior_mass"] is None
    with pytest.raises(ValueError, match=r"\(H, W\) map"):
        item_evidence(np.zeros((1, 64, 64, 1)), "Cardiomegaly", CHEST)


def test_shortcut_test_flags_one_impossible_place_only():
    marker = [item_evidence(_map((5, 5)), "Cardiomegaly", CHEST) for _ in range(9)]
    heart = [item_evidence(_map((40, 38)), "Cardiomegaly", CHEST) for _ in range(3)]
    flagged = shortcut_evidence(marker + heart)
    assert flagged["flagged"] and flagged["n_consistent_outside"] == 9 and flagged["n_items"] == 12
    assert flagged["statistic_ci95"][0] > SHORTCUT_THRESHOLD
    x0, y0, x1, y1 = flagged["suspected_box"]
    assert x0 <= 5 < x1 and y0 <= 5 < y1
    # evidence where the heart is: no flag, however consistent
    assert not shortcut_evidence([item_evidence(_map((40, 38)), "Cardiomegaly", CHEST) for _ in range(12)])["flagged"]
    # outside the prior but scattered (corners in turn): no common place, no flag
    corners = [(4, 4), (59, 4), (4, 59), (59, 59)] * 3
    scattered = shortcut_evidence([item_evidence(_map(c), "Cardiomegaly", CHEST) for c in corners])
    assert scattered["n_peak_outside_prior"] == 12 and not scattered["flagged"]
    # too few items
    assert not shortcut_evidence(marker[:3])["flagged"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_generator, query
    from PIL import Image

    from cyclex.cycle import CyclicExplainer
    from cyclex.cycle.run_folder import run_explainer

    root = tmp_path_factory.mktemp("audit")
    records = []
    for index, values in enumerate([(0.9, 0.9, 0.1), (0.9, 0.1, 0.9), (0.9, 0.9, 0.9)]):
        path = root / f"q{index}.png"
        Image.fromarray(np.uint8(query(*values)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": f"q{index}", "image": str(path), "chest_box": [0, 0, 32, 32], "masks": {}})
    runs = {}
    for name, ineffective in (("one", set()), ("two", {"Cardiomegaly"})):
        runs[name] = root / name
        run_explainer(CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker(ineffective=ineffective),
                                      frame_threshold=95), records, runs[name], batch_size=3, progress=False)
    return runs


def test_cli_audit_over_run_folders(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["audit", str(two_runs["one"]), str(two_runs["two"]), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    cardio = audit["findings"]["Cardiomegaly"]
    assert cardio["rates"]["one"]["cyclic_rate"] == 1.0 and cardio["rates"]["two"]["cyclic_rate"] == 0.0
    low, high = cardio["differences"]["two - one"]["ci95"]
    assert cardio["differences"]["two - one"]["difference"] == -1.0 and low < -0.3 and high < 0
    agreement = cardio["frame_agreement"]["one vs two"]
    assert agreement["n_pairs"] == cardio["rates"]["one"]["n"]
    assert -1 <= agreement["mean_ncc"] <= 1 and 0 <= agreement["mean_iou"] <= 1
    assert audit["provenance"]["git_commit"] and "torch" in audit["provenance"]["versions"]
    assert (tmp_path / "a" / "audit.html").is_file()
    assert "Cardiomegaly" in result.output


def test_cli_audit_refuses_bad_input(two_runs, tmp_path):
    one = CliRunner().invoke(app, ["audit", str(two_runs["one"]), "--out", str(tmp_path / "b")])
    assert one.exit_code == 1 and "at least two run folders" in one.output
    pairs = CliRunner().invoke(app, ["audit", "--generator", "demo:clean", "--tailored", "x", "--generator", "demo:shortcut",
                                     "--out", str(tmp_path / "c")])
    assert pairs.exit_code == 1 and "in pairs" in pairs.output
