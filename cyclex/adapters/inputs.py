"""What every report generator and the cyclic engine accept as images, turned into cyclex's convention.

`generator.generate(...)` and `explainer.explain(...)` take the same inputs:

* file paths (str or os.PathLike): PNG / JPEG / TIFF 8 or 16 bit, DICOM (`cyclex.datasets.images`);
* PIL images: 8-bit (0-255) and 16-bit grayscale, RGB(A) (luminance), as read from disk;
* numpy arrays and torch tensors: uint8 (0-255) and uint16 (0-65535) are scaled, bool is 0 / 1,
  floats must already be in [0, 1]; shapes (H, W), (1, H, W), (1, 1, H, W) for one image,
  (B, H, W) and (B, 1, H, W) for a batch (and (B, V, 1, H, W) studies where generators take views);
* a list or tuple of any of these, one image each.

The result is a float32 tensor (B, 1, H, W) in [0, 1] (`cyclex.image_checks.check_image_batch`).
Images of different sizes are resized to `size` when one is given, and refused otherwise with a
message naming the sizes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from cyclex.image_checks import RANGE_TOLERANCE, check_image_batch

__all__ = ["as_image_batch", "as_image_list"]


def _range_hint(lo: float, hi: float) -> str:
    if lo >= 0 and hi <= 255 + RANGE_TOLERANCE:
        return ("; these look like 8-bit intensities: pass uint8 values, a PIL image or a file path, "
                "or divide by 255")
    if lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE:
        return "; these look like [-1, 1] values: map them with (x + 1) / 2"
    return ""


def _scaled(values: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 / uint16 / bool -> float32 in [0, 1]; floats are checked to be in [0, 1]."""
    if values.dtype == torch.bool:
        return values.float()
    if values.dtype == torch.uint8:
        return values.float() / 255.0
    if getattr(torch, "uint16", None) is not None and values.dtype == torch.uint16:
        return values.float() / 65535.0
    if not values.is_floating_point():
        raise TypeError(f"{name} has integer dtype {values.dtype}; expected uint8 (0-255), uint16 (0-65535) "
                        "or float values in [0, 1]")
    values = values.float()
    if values.numel() and not torch.isnan(values).any():
        lo, hi = float(values.min()), float(values.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]{_range_hint(lo, hi)}")
    return values


def _from_array(value, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint16:  # torch has no general uint16 arithmetic: scale here
            return torch.from_numpy(value.astype(np.float32) / 65535.0)
        if value.dtype.kind == "f" and value.dtype != np.float32:
            value = value.astype(np.float32)
        return _scaled(torch.from_numpy(np.ascontiguousarray(value)), name)
    return _scaled(value.detach().cpu(), name)


def _one_image(item, name: str) -> torch.Tensor:
    """One image of any accepted kind -> (1, 1, H, W) float32."""
    if isinstance(item, (str, os.PathLike)):
        from cyclex.datasets.images import read_image

        return torch.from_numpy(read_image(item))[None, None]
    if _is_pil(item):
        from cyclex.datasets.images import pil_to_float

        return torch.from_numpy(np.ascontiguousarray(pil_to_float(item)))[None, None]
    if isinstance(item, (np.ndarray, torch.Tensor)):
        array = _from_array(item, name)
        while array.ndim > 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 2:
            raise ValueError(f"{name} must be one gray image (H, W), (1, H, W) or (1, 1, H, W), "
                             f"got shape {tuple(item.shape)}")
        return array[None, None]
    raise TypeError(f"{name} must be a file path, a PIL image, a numpy array or a tensor, got {type(item).__name__}")


def _is_pil(value) -> bool:
    try:
        from PIL import Image
    except ImportError:  # Pillow is a dependency; without it nothing can be a PIL image
        return False
    return isinstance(value, Image.Image)


def as_image_list(images, *, name: str = "images") -> list[torch.Tensor]:
    """Every image of `images` (any accepted kind) as its own (1, 1, H, W) float32 tensor in [0, 1]."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        batch = _from_array(images, name)
        if batch.ndim == 2:
            batch = batch[None, None]
        elif batch.ndim == 3:
            batch = batch[:, None]
        if batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"{name} must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(images.shape)}")
        return [check_image_batch(batch[i:i + 1], name=name) for i in range(batch.shape[0])]
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        images = [images]
    if not isinstance(images, Sequence) or isinstance(images, (bytes, bytearray)):
        raise TypeError(f"{name} must be a path, a PIL image, an array, a tensor or a list of them, "
                        f"got {type(images).__name__}")
    if not images:
        raise ValueError(f"{name} is empty: no images given")
    return [check_image_batch(_one_image(item, f"{name}[{i}]"), name=f"{name}[{i}]") for i, item in enumerate(images)]


def as_image_batch(images, *, name: str = "images", views: bool = False,
                   size: tuple[int, int] | None = None) -> torch.Tensor:
    """Any accepted input (see the module docstring) -> float32 (B, 1, H, W) in [0, 1].

    views: a (B, V, 1, H, W) tensor of multi-view studies passes through (report generators).
    size: (H, W) to resize images of different sizes to (bilinear, antialiased); None refuses them.
    """
    if views and isinstance(images, torch.Tensor) and images.ndim == 5:
        return check_image_batch(_scaled(images.detach(), name), name=name, views=True)
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point():
        return check_image_batch(_scaled(images, name), name=name)  # the engine's own batches: one check
    items = as_image_list(images, name=name)
    shapes = sorted({tuple(t.shape[-2:]) for t in items})
    if len(shapes) > 1:
        if size is None:
            raise ValueError(f"{name} differ in size {shapes[:6]}; resize them to one size first (the engine "
                             "fits every query to the tailored SD's side, see ExplainSettings.resize)")
        import torch.nn.functional as F

        items = [t if tuple(t.shape[-2:]) == tuple(size) else
                 F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
                 for t in items]
    return check_image_batch(torch.cat(items), name=name)
