"""Alignment metrics against numpy / scikit-image oracles, brute-force counts and hand-made arrays."""

import math

import numpy as np
import pytest
import torch
from skimage.feature import match_template

from cyclex.explain.alignment import (
    alignment_summary,
    annotation_target,
    area_under_iou_curve,
    dilated_boundary,
    hit_rate_curve,
    mask_boundary,
    mean_threshold_iou_curve,
    ncc,
    pixel_roc_auc,
    pooled_roc_curve,
    threshold_iou_curve,
    top_k_hit,
    top_k_pixels,
)
from cyclex.explain.chest_box import box_mask, crop_to_box

RNG = np.random.default_rng(0)


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted one half: every pair counted."""
    positives, negatives = scores[labels], scores[~labels]
    wins = 0.0
    for p in positives:
        wins += float((p > negatives).sum()) + 0.5 * float((p == negatives).sum())
    return wins / (len(positives) * len(negatives))


# ---------------------------------------------------------------------------------------------- NCC


def test_ncc_matches_numpy_corrcoef_and_match_template():
    a = RNG.random((12, 10))
    b = 0.3 * a + RNG.random((12, 10))
    expected = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert ncc(a, b) == pytest.approx(expected, abs=1e-12)
    # match_template with a template as large as the image gives the single NCC value
    assert ncc(a, b) == pytest.approx(float(match_template(a, b)[0, 0]), abs=1e-6)
    assert ncc(a, -a) == pytest.approx(-1.0)
    assert ncc(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0)


def test_ncc_in_chest_box_uses_only_the_box():
    a = RNG.random((10, 10))
    b = RNG.random((10, 10))
    box = (2, 3, 8, 9)
    expected = np.corrcoef(a[3:9, 2:8].ravel(), b[3:9, 2:8].ravel())[0, 1]
    assert ncc(a, b, chest_box=box) == pytest.approx(expected, abs=1e-12)


def test_ncc_constant_map_is_zero():
    assert ncc(np.ones((5, 5)), RNG.random((5, 5))) == 0.0
    assert ncc(np.zeros((5, 5), dtype=bool), RNG.random((5, 5))) == 0.0


def test_nan_and_shape_errors():
    a = RNG.random((6, 6))
    bad = a.copy()
    bad[2, 2] = np.nan
    mask = a > 0.5
    with pytest.raises(ValueError, match="NaN"):
        ncc(bad, a)
    with pytest.raises(ValueError, match="NaN"):
        pixel_roc_auc(bad, mask)
    with pytest.raises(ValueError, match="NaN"):
        top_k_hit(bad, mask, 5)
    with pytest.raises(ValueError, match="NaN"):
        threshold_iou_curve(bad, mask)
    with pytest.raises(ValueError, match="same shape"):
        ncc(a, RNG.random((6, 7)))
    with pytest.raises(ValueError, match="same shape"):
        pixel_roc_auc(a, np.ones((5, 6), dtype=bool))
    with pytest.raises(ValueError, match="same shape"):
        top_k_hit(a, np.ones((5, 6), dtype=bool), 5)
    with pytest.raises(ValueError, match="same shape"):
        threshold_iou_curve(a, np.ones((5, 6), dtype=bool))
    with pytest.raises(ValueError, match="binary"):
        pixel_roc_auc(a, a)
    with pytest.raises(ValueError, match="chest_box"):
        ncc(a, a, chest_box=(0, 0, 7, 3))


# ---------------------------------------------------------------------------------------------- AUC


def test_pixel_auc_matches_brute_force_pair_count():
    scores = np.round(RNG.random((9, 8)), 1)  # rounding creates ties
    labels = RNG.random((9, 8)) > 0.6
    assert pixel_roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores.ravel(), labels.ravel()), abs=1e-12)


def test_pixel_auc_in_chest_box_and_perfect_separation():
    m = np.zeros((6, 6))
    m[1:3, 1:3] = 1.0
    mask = m > 0
    assert pixel_roc_auc(m, mask) == 1.0
    assert pixel_roc_auc(1 - m, mask) == 0.0
    box = (0, 0, 4, 4)
    scores = RNG.random((6, 6))
    expected = brute_force_auc(scores[:4, :4].ravel(), mask[:4, :4].ravel())
    assert pixel_roc_auc(scores, mask, chest_box=box) == pytest.approx(expected)


def test_pixel_auc_edge_cases():
    scores = RNG.random((5, 5))
    assert math.isnan(pixel_roc_auc(scores, np.zeros((5, 5), dtype=bool)))  # empty mask
    assert math.isnan(pixel_roc_auc(scores, np.ones((5, 5), dtype=bool)))  # all positive
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, :] = True
    assert pixel_roc_auc(np.full((5, 5), 0.3), mask) == 0.5  # constant map


def test_pooled_roc_curve_auc_is_pooled_brute_force():
    maps = [RNG.random((5, 5)) * 3, RNG.random((5, 5))]
    masks = [RNG.random((5, 5)) > 0.5, RNG.random((5, 5)) > 0.5]
    fpr, tpr, auc = pooled_roc_curve(maps, masks)
    normalised = [(m - m.min()) / (m.max() - m.min()) for m in maps]
    expected = brute_force_auc(np.concatenate([m.ravel() for m in normalised]),
                               np.concatenate([k.ravel() for k in masks]))
    assert auc == pytest.approx(expected)
    assert fpr[0] == 0 and tpr[-1] == 1


# ---------------------------------------------------------------------------------------------- hit rate


def test_top_k_hit_by_hand():
    m = np.zeros((10, 10))
    m[0, 0] = 10.0  # the single top-1 % pixel
    m[5:7, 5:7] = 5.0  # the next 4 pixels (top 5 %)
    mask = np.zeros((10, 10), dtype=bool)
    mask[5:7, 5:7] = True
    assert top_k_pixels(m, 1).sum() == 1
    assert top_k_hit(m, mask, 1) == 0.0
    assert top_k_hit(m, mask, 5) == 1.0
    percentiles, rates = hit_rate_curve([m, m[::-1, ::-1]], [mask, mask], percentiles=(1, 5))
    # the flipped map puts its maximum at (9, 9): miss at 1 %, and its 5 % block lands at (3:5, 3:5): miss
    assert percentiles.tolist() == [1.0, 5.0]
    assert rates.tolist() == [0.0, 0.5]


def test_hit_edge_cases():
    m = RNG.random((6, 6))
    assert math.isnan(top_k_hit(m, np.zeros((6, 6), dtype=bool), 10))  # empty mask
    assert top_k_hit(m, np.ones((6, 6), dtype=bool), 10) == 1.0  # all-positive mask
    assert top_k_hit(np.full((6, 6), 2.0), np.ones((6, 6), dtype=bool), 10) == 0.0  # constant map
    with pytest.raises(ValueError, match="k_percent"):
        top_k_hit(m, m > 0.5, 0)
    # samples with empty masks are left out of the rate
    _, rates = hit_rate_curve([m, m], [np.ones((6, 6), dtype=bool), np.zeros((6, 6), dtype=bool)], (10,))
    assert rates.tolist() == [1.0]


def test_hit_in_chest_box_ignores_maximum_outside():
    m = np.zeros((8, 8))
    m[0, 0] = 9.0  # text-marker artefact outside the chest
    m[4, 4] = 1.0
    mask = np.zeros((8, 8), dtype=bool)
    mask[4, 4] = True
    assert top_k_hit(m, mask, 1) == 0.0
    assert top_k_hit(m, mask, 1, chest_box=(2, 2, 8, 8)) == 1.0


# ---------------------------------------------------------------------------------------------- IoU


def test_threshold_iou_curve_by_hand():
    m = np.array([[0.0, 0.5], [1.0, 1.0]])
    mask = np.array([[False, False], [True, False]])
    thresholds, ious = threshold_iou_curve(m, mask, thresholds=(0.0, 0.5, 1.0))
    # t=0: all 4 selected -> 1/4; t=0.5: 3 selected -> 1/3; t=1: 2 selected -> 1/2
    assert ious.tolist() == pytest.approx([0.25, 1 / 3, 0.5])
    area = area_under_iou_curve(thresholds, ious)
    assert area == pytest.approx(0.5 * (0.25 + 1 / 3) / 2 + 0.5 * (1 / 3 + 0.5) / 2)


def test_threshold_iou_edge_cases():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 1] = True
    t, ious = threshold_iou_curve(np.full((4, 4), 0.7), mask)
    assert np.all(ious == 0.0)  # constant map selects nothing
    t, ious = threshold_iou_curve(RNG.random((4, 4)), np.zeros((4, 4), dtype=bool))
    assert np.isnan(ious).all() and math.isnan(area_under_iou_curve(t, ious))  # empty mask
    m = RNG.random((4, 4))
    _, ious = threshold_iou_curve(m, np.ones((4, 4), dtype=bool), thresholds=(0.0, 1.0))
    assert ious.tolist() == [1.0, 1 / 16]  # all-positive mask: IoU = share selected
    with pytest.raises(ValueError, match="thresholds"):
        threshold_iou_curve(m, mask, thresholds=(0.5, 0.2))
    # the mean curve skips samples with empty masks
    _, mean = mean_threshold_iou_curve([m, m], [np.ones((4, 4), dtype=bool), np.zeros((4, 4), dtype=bool)], (0.0, 1.0))
    assert mean.tolist() == [1.0, 1 / 16]


# ---------------------------------------------------------------------------------------------- boundaries, boxes


def test_boundaries_by_hand():
    mask = np.zeros((7, 7), dtype=bool)
    mask[2:5, 2:5] = True
    boundary = mask_boundary(mask)
    expected = mask.copy()
    expected[3, 3] = False  # the 3x3 square's contour is its ring of 8 pixels
    assert np.array_equal(boundary, expected)
    assert np.array_equal(dilated_boundary(mask, radius=0), boundary)
    dilated = dilated_boundary(mask, radius=1)
    assert dilated[1, 3] and dilated[3, 3] and not dilated[0, 0] and dilated.sum() == 3 * 3 + 12
    assert not mask_boundary(np.zeros((4, 4), dtype=bool)).any()
    full = np.ones((3, 3), dtype=bool)
    assert mask_boundary(full).sum() == 8  # reaching the image border counts as boundary
    assert np.array_equal(annotation_target(mask, "full"), mask)
    with pytest.raises(ValueError, match="kind"):
        annotation_target(mask, "edge")


def test_box_helpers():
    a = np.arange(20.0).reshape(4, 5)
    assert crop_to_box(a, (1, 2, 3, 4)).tolist() == [[11.0, 12.0], [16.0, 17.0]]
    assert box_mask((4, 5), (1, 2, 3, 4)).sum() == 4
    assert crop_to_box(a, None) is a


def test_alignment_summary_keys_and_values():
    m = RNG.random((16, 16))
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:10, 4:10] = True
    summary = alignment_summary(m, mask, chest_box=(1, 1, 15, 15), percentiles=(5,))
    assert summary["full/ncc"] == pytest.approx(ncc(m, mask, (1, 1, 15, 15)))
    assert summary["boundary/auc"] == pytest.approx(pixel_roc_auc(m, mask_boundary(mask), (1, 1, 15, 15)))
    assert set(summary) == {f"{k}/{n}" for k in ("full", "boundary", "dilated_boundary")
                            for n in ("ncc", "auc", "auc_iou", "hit@5")}
