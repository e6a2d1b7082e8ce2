"""Feature identification frames (seed 003) and difference maps against hand-made images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cyclex.explain.frames import (
    calibrate_frame_thresholds,
    choose_threshold,
    difference_maps,
    estimate_chest_box,
    feature_frame,
    mask_iou,
)
from cyclex.explain.overlays import draw_frame, normalize_map, show_map_on_image


def _blocks(size=64, blocks=((2, 2, 10, 10, 1.0),)):
    """A counterfactual equal to a zero query except rectangles (x, y, w, h, value)."""
    query = np.zeros((size, size), np.float32)
    cf = query.copy()
    for x, y, w, h, v in blocks:
        cf[y : y + h, x : x + w] = v
    return query, cf


def test_difference_maps_signed_and_positive_part():
    query = np.full((8, 8), 0.5, np.float32)
    cf = query.copy()
    cf[0, 0] = 0.2  # query brighter: positive
    cf[7, 7] = 0.9  # query darker: negative
    absolute, signed, positive = difference_maps(query, cf)
    assert signed[0, 0] == pytest.approx(0.3) and signed[7, 7] == pytest.approx(-0.4)
    assert positive[0, 0] == pytest.approx(0.3) and positive[7, 7] == 0.0
    assert absolute[7, 7] == pytest.approx(0.4)
    boxed = difference_maps(query, cf, chest_box=(4, 4, 8, 8))
    assert boxed[1][0, 0] == 0.0 and boxed[1][7, 7] == pytest.approx(-0.4)
    # tensors (1, 1, H, W) are accepted
    t_abs, _, _ = difference_maps(torch.from_numpy(query)[None, None], torch.from_numpy(cf)[None, None])
    np.testing.assert_allclose(t_abs, absolute)


def test_positive_blur_smooths_only_the_positive_part_with_the_5x5_gaussian():
    query = np.full((16, 16), 0.5, np.float32)
    cf = query.copy()
    cf[8, 8] = 0.5 - 0.8  # one bright query pixel (clipped range does not matter to the map)
    cf[2, 2] = 0.9  # a darker query pixel: negative, must not leak into the smoothed positive map
    _, signed, raw = difference_maps(query, cf)
    _, signed_smoothed, smoothed = difference_maps(query, cf, positive_blur=5)
    np.testing.assert_array_equal(signed_smoothed, signed)  # the signed map stays raw
    # OpenCV's 5-tap Gaussian for sigma 0 is [1, 4, 6, 4, 1] / 16, so by hand the centre keeps
    # 0.8 * (6/16)^2, its 4-neighbour 0.8 * (6/16)(4/16), and the total mass stays 0.8.
    assert raw[8, 8] == pytest.approx(0.8)
    assert smoothed[8, 8] == pytest.approx(0.8 * (6 / 16) ** 2)
    assert smoothed[8, 9] == pytest.approx(0.8 * (6 / 16) * (4 / 16))
    assert smoothed.sum() == pytest.approx(0.8, rel=1e-5)
    assert smoothed[0:5, 0:5].max() == 0.0
    # with a chest box, the smoothed map is zero outside it as well
    _, _, boxed = difference_maps(query, cf, chest_box=(0, 0, 9, 16), positive_blur=5)
    assert boxed[:, 9:].max() == 0.0 and boxed[8, 8] == pytest.approx(0.8 * (6 / 16) ** 2)
    with pytest.raises(ValueError, match="positive_blur"):
        difference_maps(query, cf, positive_blur=4)


def test_frame_keeps_the_k_largest_components_exactly():
    # seven separated squares of distinct sizes; the 5 largest must be kept, largest first
    sides = [3, 4, 5, 6, 7, 8, 9]
    blocks, x = [], 1
    for s in sides:
        blocks.append((x, 20, s, s, 1.0))
        x += s + 6  # gap wider than the 5x5 blur's reach
    query, cf = _blocks(size=96, blocks=blocks)
    frame = feature_frame(query, cf, threshold=95, k=5, blur=1)
    assert [c.area for c in frame.components] == [81, 64, 49, 36, 25]
    assert frame.area == 81 + 64 + 49 + 36 + 25
    # the kept masks are exactly the five largest squares
    expected = np.zeros_like(frame.mask)
    for bx, by, w, h, _ in blocks[2:]:
        expected[by : by + h, bx : bx + w] = True
    np.testing.assert_array_equal(frame.mask, expected)
    assert frame.components[0].bbox == (blocks[-1][0], 20, 9, 9)
    assert len(frame.contours) == 5 and frame.contours[0].shape[1] == 2


def test_blur_then_threshold_behaviour():
    # a 20x20 square of difference 0.5 (127.5 on 0-255): the 5x5 blur softens its border
    query, cf = _blocks(blocks=((20, 20, 20, 20, 0.5),))
    blurred = cv2.GaussianBlur(np.abs(query - cf) * 255, (5, 5), 0)
    for level in (30, 95, 120):
        frame = feature_frame(query, cf, threshold=level)
        assert frame.area == int((blurred > level).sum())
    low, high = feature_frame(query, cf, threshold=30), feature_frame(query, cf, threshold=120)
    assert low.area > 400 > high.area  # low L grows past the square, high L shrinks inside it
    # a difference below L everywhere gives an empty frame
    faint_q, faint_cf = _blocks(blocks=((20, 20, 20, 20, 0.3),))  # 76.5 < 95
    empty = feature_frame(faint_q, faint_cf, threshold=95)
    assert empty.area == 0 and empty.components == []
    # normalize stretches D to max 255: the faint square's interior (76.5 -> 255) is kept again
    stretched = feature_frame(faint_q, faint_cf, threshold=95, normalize=True)
    assert stretched.area == int((blurred * (255 / blurred.max()) > 95).sum()) and stretched.area >= 400


def test_chest_box_masks_out_markers():
    query, cf = _blocks(blocks=((20, 20, 16, 16, 1.0), (0, 0, 6, 6, 1.0)))
    inside = feature_frame(query, cf, chest_box=(10, 10, 60, 60))
    assert len(inside.components) == 1 and not inside.mask[:6, :6].any()


def test_choose_threshold_stable_and_calibrated():
    # a flat block: every candidate gives the same frame, the centre 95 wins the tie
    query, cf = _blocks(blocks=((10, 10, 30, 30, 1.0),))
    assert choose_threshold(query, cf) == 95.0
    # block A at 110 and block B at 97.5 (0-255): L in {85, 90, 95} keeps A and B, L in {100, 105}
    # keeps A only. Neighbour IoU: 85 -> 1, 90 -> 1, 95 < 1, 100 < 1, 105 -> 1; nearest 95 of the
    # perfectly stable ones is 90.
    query, cf = _blocks(blocks=((5, 5, 20, 20, 110 / 255), (40, 40, 10, 10, 97.5 / 255)))
    assert choose_threshold(query, cf, blur=1) == 90.0
    # calibration: a ramp 0..107 (cols 0-39) beside a plateau at 153 (cols 40-63) that is the truth;
    # lower L add ramp columns to the frame, L = 114 keeps exactly the plateau
    ramp_q = np.zeros((64, 64), np.float32)
    ramp_cf = np.zeros((64, 64), np.float32)
    ramp_cf[:, :40] = np.linspace(0, 107 / 255, 40, dtype=np.float32)
    ramp_cf[:, 40:] = 153 / 255
    truth = np.zeros((64, 64), bool)
    truth[:, 40:] = True
    calibrated = calibrate_frame_thresholds([("Edema", ramp_q, ramp_cf, truth)], candidates=(85, 95, 105, 114))
    assert calibrated == {"Edema": 114.0}
    assert mask_iou(truth, truth) == 1.0 and mask_iou(truth, ~truth) == 0.0


def test_estimate_chest_box_ignores_small_marker():
    image = np.full((64, 64), 0.05, np.float32)
    image[10:54, 12:50] = 0.7  # the body
    image[2:5, 58:62] = 1.0  # a text marker
    x0, y0, x1, y1 = estimate_chest_box(image)
    assert abs(x0 - 12) <= 1 and abs(y0 - 10) <= 1 and abs(x1 - 50) <= 1 and abs(y1 - 54) <= 1
    assert estimate_chest_box(np.zeros((16, 16), np.float32)) == (0, 0, 16, 16)


def test_overlay_matches_grad_cam_formula_and_refuses_bad_images():
    image = np.full((4, 4), 0.5, np.float32)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    out = show_map_on_image(image, heat)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    jet_hot = cv2.cvtColor(cv2.applyColorMap(np.uint8([[255]]), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0, 0] / 255
    jet_cold = cv2.cvtColor(cv2.applyColorMap(np.uint8([[0]]), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0, 0] / 255
    blended = np.stack([0.5 * jet_hot + 0.25, 0.5 * jet_cold + 0.25])
    expected = np.uint8(255 * blended / blended.max())
    np.testing.assert_array_equal(out[0, 0], expected[0])
    np.testing.assert_array_equal(out[1, 1], expected[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        show_map_on_image(image * 255, heat)
    with pytest.raises(ValueError, match="normalize_map"):
        show_map_on_image(image, heat * 3)
    assert normalize_map(heat * 3).max() == 1.0
    assert normalize_map(-heat, positive_only=False)[0, 0] == 0.0


def test_draw_frame_marks_the_contour():
    query, cf = _blocks(blocks=((20, 20, 10, 10, 1.0),))
    frame = feature_frame(query, cf, blur=1)
    drawn = draw_frame(query, frame, color=(255, 0, 0), fill_alpha=0.0)
    assert tuple(drawn[20, 20]) == (255, 0, 0) and tuple(drawn[0, 0]) == (0, 0, 0)
    with pytest.raises(ValueError, match="same shape"):
        feature_frame(query, cf[:10])
