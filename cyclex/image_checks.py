"""The image convention of all of cyclex, checked in one place.

A batch of grayscale X-rays is a float tensor of shape (B, 1, H, W) with values in [0, 1]; report
generators also take multi-view studies (B, V, 1, H, W) (R2Gen on iu_xray). A single X-ray or a map
drawn on it (difference map, heatmap) is an (H, W) array. Every boundary that takes images calls
`check_image_batch`; every function that takes one image or map calls `as_gray_array`. Both fail
with a message naming the argument and what was expected (STYLE.md point 13).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["RANGE_TOLERANCE", "as_gray_array", "check_image_batch", "check_unit_range"]

# Values this far outside [0, 1] are float rounding (resizing, float16 decoders) and are clamped;
# anything further out is a caller that passed 0-255 or [-1, 1] images.
RANGE_TOLERANCE = 1e-4


def check_unit_range(values: np.ndarray | torch.Tensor, *, name: str, hint: str = "") -> None:
    """Raise ValueError naming `name` unless every value is in [0, 1] (within RANGE_TOLERANCE).

    hint: appended to the message (e.g. how to rescale).
    """
    lo, hi = float(values.min()), float(values.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]{hint}")


def check_image_batch(images: torch.Tensor, *, name: str = "images", views: bool = False) -> torch.Tensor:
    """The batch as float32 (B, 1, H, W) in [0, 1], clamped; a TypeError / ValueError naming `name` otherwise.

    views: also accept multi-view studies (B, V, 1, H, W) (report generators).
    Refuses non-tensors, other shapes, NaN and values outside [0, 1] (beyond RANGE_TOLERANCE).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 1, H, W), got {type(images).__name__}")
    ranks = (4, 5) if views else (4,)
    if images.ndim not in ranks or images.shape[-3] != 1:
        expected = "(B, 1, H, W) or (B, V, 1, H, W)" if views else "(B, 1, H, W)"
        raise ValueError(f"{name} must be a {expected} tensor, got shape {tuple(images.shape)}")
    images = images.float()
    if torch.isnan(images).any():
        raise ValueError(f"{name} contains NaN values")
    if images.numel():
        check_unit_range(images, name=name)
    return images.clamp(0, 1)


def as_gray_array(value, *, name: str = "image", dtype: type = np.float32) -> np.ndarray:
    """One X-ray or map as an (H, W) array of `dtype` from a numpy array or tensor.

    Accepts (H, W), (1, H, W) and (1, 1, H, W); any value range (maps are not images). Refuses other
    shapes and NaN / inf with a ValueError naming `name`.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=dtype)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be a single gray image (H, W), got shape {np.shape(value)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array
