"""benchmarks/labeler.py: the split, the report text, the keyword baseline, scoring and data checks."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.labeler import (
    GOLD_COLUMNS,
    MAPPED_FINDINGS,
    keyword_baseline,
    read_openi,
    report_text,
    score,
    split_of,
)


def test_split_is_stable_and_about_half():
    uids = [str(i) for i in range(1, 2001)]
    splits = [split_of(u) for u in uids]
    assert splits == [split_of(u) for u in uids]  # deterministic, independent of order
    assert set(splits) == {"dev", "held_out"}
    assert 0.45 < splits.count("held_out") / len(splits) < 0.55
    assert split_of("1") == "held_out" and split_of("3") == "dev"  # pinned: the committed results use it


def test_report_text_closes_the_findings_sentence():
    assert report_text("Heart is enlarged", "No effusion.") == "Heart is enlarged. No effusion."
    assert report_text("Heart is enlarged.", "") == "Heart is enlarged."
    assert report_text("", " Clear lungs. ") == "Clear lungs."


def test_keyword_baseline_negates_within_the_sentence_only():
    present = keyword_baseline("No effusion. Small right pneumothorax. Cardiomegaly without edema.")
    assert present["Pleural Effusion"] is False
    assert present["Pneumothorax"] is True
    assert present["Cardiomegaly"] is True and present["Edema"] is False
    assert keyword_baseline("Possible pneumonia.")["Pneumonia"] is True  # the baseline knows no uncertainty


def test_score_counts_and_macro_f1():
    truth = np.zeros((4, len(MAPPED_FINDINGS)), bool)
    predicted = truth.copy()
    truth[:2, 0] = True  # two true Atelectasis
    predicted[:1, 0] = True  # one found, one missed
    predicted[3, 1] = True  # one false Cardiomegaly
    result = score(truth, predicted, bootstrap=50, seed=0)
    first = result["per_finding"][MAPPED_FINDINGS[0]]
    assert (first["tp"], first["fp"], first["fn"], first["support"]) == (1, 0, 1, 2)
    assert first["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["per_finding"][MAPPED_FINDINGS[1]]["f1"] == 0.0
    assert result["macro_f1"] == pytest.approx((2 / 3) / len(MAPPED_FINDINGS), abs=1e-4)
    low, high = result["macro_f1_bootstrap_95"]
    assert 0.0 <= low <= high <= 1.0


def _write_csv(path, rows, columns=None):
    columns = columns or ["uid", "findings", "impression", *sorted({c for cs in GOLD_COLUMNS.values() for c in cs})]
    lines = [",".join(columns)] + [",".join(str(row.get(c, "0")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def test_read_openi_maps_mass_or_nodule_to_lung_lesion(tmp_path):
    data = tmp_path / "reports.csv"
    _write_csv(data, [{"uid": "7", "findings": "Nodule", "impression": "Clear", "Nodule": 1},
                      {"uid": "8", "findings": "", "impression": "Normal.", "Effusion": 1}])
    first, second = read_openi(data)
    assert first["uid"] == "7" and first["text"] == "Nodule. Clear"
    assert first["gold"]["Lung Lesion"] is True and first["gold"]["Pleural Effusion"] is False
    assert second["gold"]["Pleural Effusion"] is True and second["gold"]["Lung Lesion"] is False


def test_read_openi_names_missing_file_columns_and_bad_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="openi_dev/reports.csv"):
        read_openi(tmp_path / "absent.csv")
    data = tmp_path / "reports.csv"
    _write_csv(data, [{"uid": "1"}], columns=["uid", "findings", "impression", "Atelectasis"])
    with pytest.raises(KeyError, match="Cardiomegaly"):
        read_openi(data)
    _write_csv(data, [{"uid": "1", "Edema": "yes"}])
    with pytest.raises(ValueError, match=r"line 2.*Edema.*0 or 1"):
        read_openi(data)
