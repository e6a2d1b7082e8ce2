"""cyclex.image_checks: the one image-batch validator and the one (H, W) converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cyclex.image_checks import as_gray_array, check_image_batch, check_unit_range


def test_batch_is_float32_and_rounding_is_clamped():
    images = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    images[0, 0, 0, 0] = 1 + 5e-5
    images[1, 0, 0, 0] = -5e-5
    checked = check_image_batch(images)
    assert checked.dtype == torch.float32 and checked.shape == (2, 1, 4, 4)
    assert float(checked.max()) == 1.0 and float(checked.min()) == 0.0


def test_batch_errors_name_the_argument_and_the_expectation():
    with pytest.raises(TypeError, match=r"queries must be a torch.Tensor of shape \(B, 1, H, W\), got ndarray"):
        check_image_batch(np.zeros((1, 1, 4, 4)), name="queries")
    with pytest.raises(ValueError, match=r"images must be a \(B, 1, H, W\) tensor, got shape \(2, 3, 4, 4\)"):
        check_image_batch(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"must be a \(B, 1, H, W\) tensor, got shape \(2, 2, 1, 4, 4\)"):
        check_image_batch(torch.zeros(2, 2, 1, 4, 4))
    bad = torch.zeros(1, 1, 4, 4)
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="images contains NaN values"):
        check_image_batch(bad)
    eight_bit = torch.zeros(1, 1, 2, 2)
    eight_bit[0, 0, 0, 0] = 255.0
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\], got values in \[0.000, 255.000\]"):
        check_image_batch(eight_bit)


def test_views_accepts_multi_view_studies_only_when_asked():
    studies = torch.rand(3, 2, 1, 8, 8)
    assert check_image_batch(studies, views=True).shape == (3, 2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\) or \(B, V, 1, H, W\) tensor, got shape \(3, 2, 3, 8, 8\)"):
        check_image_batch(torch.rand(3, 2, 3, 8, 8), views=True)


def test_unit_range_hint_is_appended():
    with pytest.raises(ValueError, match=r"heat_map must be in \[0, 1\], got values in \[0.000, 3.000\]; rescale"):
        check_unit_range(np.array([0.0, 3.0]), name="heat_map", hint="; rescale")
    check_unit_range(np.array([0.0, 1.0 + 5e-5]), name="heat_map")  # rounding passes


def test_gray_array_squeezes_leading_ones_and_refuses_the_rest():
    tensor = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3)
    array = as_gray_array(tensor)
    assert array.shape == (2, 3) and array.dtype == np.float32 and array[1, 2] == 5.0
    assert as_gray_array(np.ones((1, 2, 2)), dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match=r"map must be a single gray image \(H, W\), got shape \(2, 2, 2\)"):
        as_gray_array(np.ones((2, 2, 2)), name="map")
    with pytest.raises(ValueError, match="query contains NaN or infinite values"):
        as_gray_array(np.array([[0.0, np.inf]]), name="query")
