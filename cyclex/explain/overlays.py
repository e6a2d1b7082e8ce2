"""Drawing maps and frames on the query (STYLE.md point 14: `frames` computes, this module renders).

`show_map_on_image` colours a [0, 1] map over an X-ray as pytorch-grad-cam's `show_cam_on_image`
does; `normalize_map` scales a difference map into [0, 1] for it; `draw_frame` tints a
`FeatureFrame`'s mask and draws its contours. All return uint8 (H, W, 3) RGB arrays, which
`cyclex.atomic_io.write_png_atomic` writes as PNGs.
"""

from __future__ import annotations

import cv2
import numpy as np

from cyclex.explain.frames import FeatureFrame
from cyclex.image_checks import as_gray_array, check_unit_range

__all__ = ["draw_frame", "normalize_map", "show_map_on_image"]


def _rgb_float(image) -> np.ndarray:
    """(H, W) gray or (H, W, 3) RGB float in [0, 1] -> (H, W, 3) float32; values above 1 are refused."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 3:
        rgb = array
    else:
        rgb = np.repeat(as_gray_array(array)[..., None], 3, axis=-1)
    check_unit_range(rgb, name="image")
    return np.clip(rgb, 0.0, 1.0)


def normalize_map(values, *, positive_only: bool = True) -> np.ndarray:
    """Scale a map to [0, 1] by its maximum (absolute maximum for signed maps mapped around 0.5)."""
    array = as_gray_array(values, name="map")
    if positive_only:
        array = np.maximum(array, 0.0)
        top = float(array.max())
        return array / top if top > 0 else array
    top = float(np.abs(array).max())
    return 0.5 + 0.5 * array / top if top > 0 else np.full_like(array, 0.5)


def show_map_on_image(
    image, heat_map, use_rgb: bool = True, colormap: int = cv2.COLORMAP_JET, image_weight: float = 0.5
) -> np.ndarray:
    """Overlay a [0, 1] map on an image, as pytorch-grad-cam's `show_cam_on_image` does.

    image: (H, W) gray or (H, W, 3) RGB float in [0, 1] (float images above 1 are refused).
    heat_map: (H, W) in [0, 1]. Returns uint8 (H, W, 3), RGB when use_rgb.
    """
    rgb = _rgb_float(image)
    values = as_gray_array(heat_map, name="heat_map")
    if values.shape != rgb.shape[:2]:
        raise ValueError(f"heat_map {values.shape} and image {rgb.shape[:2]} must have the same (H, W)")
    check_unit_range(values, name="heat_map", hint="; scale it with normalize_map first")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight should be in [0, 1], got {image_weight}")
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(values, 0, 1)), colormap)
    if use_rgb:
        heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    blended = (1 - image_weight) * (np.float32(heat) / 255) + image_weight * rgb
    blended = blended / max(float(blended.max()), 1e-8)
    return np.uint8(255 * blended)


def draw_frame(image, frame: FeatureFrame, color: tuple[int, int, int] = (255, 0, 0), thickness: int = 1,
               fill_alpha: float = 0.25) -> np.ndarray:
    """The query with the frame's mask tinted and its contours drawn: uint8 (H, W, 3) RGB."""
    rgb = np.uint8(255 * _rgb_float(image))
    if frame.mask.shape != rgb.shape[:2]:
        raise ValueError(f"frame mask {frame.mask.shape} and image {rgb.shape[:2]} must have the same (H, W)")
    out = rgb.copy()
    if fill_alpha > 0 and frame.mask.any():
        tint = np.array(color, dtype=np.float32)
        out[frame.mask] = np.uint8((1 - fill_alpha) * out[frame.mask] + fill_alpha * tint)
    contours = [c.reshape(-1, 1, 2).astype(np.int32) for c in frame.contours]
    if contours:
        cv2.drawContours(out, contours, -1, color, thickness)
    return out
