"""Chest boxes: where in an X-ray the comparison happens (seed 000 restricts maps and masks to the
chest with REFLACX's boxes, which removes text-marker artefacts).

A box is (x0, y0, x1, y1) in pixel corners, x1 / y1 exclusive; every function takes it checked
against the image's (H, W). `estimate_chest_box` (in `frames`) finds one when the data has none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ChestBox", "box_mask", "check_chest_box", "crop_to_box"]

ChestBox = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 / y1 exclusive


def check_chest_box(chest_box: Sequence[int], shape: tuple[int, int]) -> ChestBox:
    """Validate (x0, y0, x1, y1) as a non-empty box inside an (H, W) image; returns ints."""
    if chest_box is None or len(chest_box) != 4:
        raise ValueError(f"chest_box must be (x0, y0, x1, y1), got {chest_box!r}")
    x0, y0, x1, y1 = (int(v) for v in chest_box)
    height, width = shape
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"chest_box {tuple(chest_box)} is not a non-empty box inside an image of (H, W) = {shape}")
    return x0, y0, x1, y1


def box_mask(shape: tuple[int, int], chest_box: Sequence[int]) -> np.ndarray:
    """(H, W) bool mask that is True inside chest_box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = check_chest_box(chest_box, shape)
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def crop_to_box(array: np.ndarray, chest_box: Sequence[int] | None) -> np.ndarray:
    """array[y0:y1, x0:x1]; `chest_box=None` returns the array unchanged."""
    if chest_box is None:
        return array
    x0, y0, x1, y1 = check_chest_box(chest_box, array.shape[:2])
    return array[y0:y1, x0:x1]
