"""Bring each query to the tailored SD's square side, and bring maps and frames back to the query.

Real X-rays come in every size (2400 x 1970, 3000 x 2500, ...) while a tailored SD works at one
square side S (its `sample_size`, e.g. 512). `fit_image` scales a query so that it fits S x S
keeping its aspect ratio, then:

* "pad" (default): the longer side becomes S, the shorter one is centred and padded with black (0,
  the film's background) -- nothing of the image is lost;
* "crop": the shorter side becomes S and the longer one is centre-cropped -- nothing is padded, the
  edges of the longer side are not seen (maps there are 0 when brought back);
* "stretch": both sides are resized to S (the aspect ratio changes; what `--image-size` did before);
* "none": the query is used as it comes (every query of a batch must then have the same size).

The `ImageFit` of a query records the geometry (original size, scaled size, offset), so the engine's
maps (S x S) and frames are brought back onto the original image for overlays (`to_original`,
`frame_to_original`); the run folder writes those overlays beside the S x S files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cyclex.explain.frames import FeatureFrame, frame_from_difference

FIT_MODES = ("pad", "crop", "stretch", "none")
DEFAULT_FIT = "pad"


def check_fit_mode(mode: str, *, name: str = "resize") -> str:
    if mode not in FIT_MODES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, FIT_MODES))}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class ImageFit:
    """How one query (H, W) became the engine's (S, S) image.

    scaled_size: (h, w) after scaling, before padding / cropping. offset: (top, left) of the scaled
    image inside the S x S canvas ("pad") or of the S x S window inside the scaled image ("crop").
    """

    mode: str
    original_size: tuple[int, int]
    size: tuple[int, int]
    scaled_size: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    @property
    def identity(self) -> bool:
        """True when the query went in as it came (no resize, pad or crop)."""
        return self.original_size == self.size == self.scaled_size

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    # -- forward: the query -> the engine's image -------------------------------------------------
    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, H, W) float in [0, 1] -> (1, 1, S, S), as `fit_image` planned."""
        if self.identity:
            return image
        scaled = _resize(image, self.scaled_size)
        top, left = self.offset
        height, width = self.size
        if self.mode == "pad":
            canvas = torch.zeros(1, 1, height, width, dtype=scaled.dtype)
            canvas[..., top:top + self.scaled_size[0], left:left + self.scaled_size[1]] = scaled
            return canvas
        if self.mode == "crop":
            return scaled[..., top:top + height, left:left + width].contiguous()
        return scaled

    def box_to_fitted(self, box) -> tuple[int, int, int, int]:
        """A chest box (x0, y0, x1, y1) in the query's pixels -> the same box on the engine's image."""
        x0, y0, x1, y1 = (float(v) for v in box)
        sy = self.scaled_size[0] / self.original_size[0]
        sx = self.scaled_size[1] / self.original_size[1]
        shift = 1 if self.mode == "pad" else -1 if self.mode == "crop" else 0
        top, left = (shift * v for v in self.offset)
        height, width = self.size
        clip = lambda v, hi: int(min(max(round(v), 0), hi))  # noqa: E731
        return (clip(x0 * sx + left, width), clip(y0 * sy + top, height),
                clip(x1 * sx + left, width), clip(y1 * sy + top, height))

    # -- back: the engine's maps -> the query --------------------------------------------------------
    def to_original(self, values: np.ndarray, *, nearest: bool = False) -> np.ndarray:
        """An (S, S) map or mask on the engine's image -> (H, W) on the original query.

        Padding is cut away; with "crop" the parts of the query the engine never saw are 0.
        nearest: for masks (keeps them binary); else bilinear.
        """
        array = np.asarray(values)
        if array.shape != self.size:
            raise ValueError(f"map has shape {array.shape}; expected the engine's image size {self.size}")
        if self.identity:
            return array
        top, left = self.offset
        h, w = self.scaled_size
        if self.mode == "pad":
            region = array[top:top + h, left:left + w]
        elif self.mode == "crop":
            region = np.zeros((h, w), dtype=array.dtype)
            region[top:top + self.size[0], left:left + self.size[1]] = array
        else:
            region = array
        interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        source = region.astype(np.uint8) if region.dtype == bool else region.astype(np.float32)
        back = cv2.resize(source, (self.original_size[1], self.original_size[0]), interpolation=interpolation)
        return back.astype(bool) if region.dtype == bool else back

    def frame_to_original(self, frame: FeatureFrame) -> FeatureFrame:
        """The frame's mask on the original query, its components and contours recomputed there."""
        if self.identity:
            return frame
        mask = self.to_original(frame.mask, nearest=True)
        rebuilt = frame_from_difference(mask.astype(np.float32) * 255.0, 127.5, k=max(1, len(frame.components)))
        return FeatureFrame(mask=rebuilt.mask, components=rebuilt.components, threshold=frame.threshold)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def plan_fit(original_size: tuple[int, int], side: int | None, mode: str) -> ImageFit:
    """The geometry that brings an (H, W) query to (side, side) with `mode` (see the module docstring)."""
    check_fit_mode(mode)
    height, width = (int(v) for v in original_size)
    if side is None or mode == "none":
        return ImageFit("none", (height, width), (height, width), (height, width))
    side = int(side)
    if side < 1:
        raise ValueError(f"image side must be >= 1, got {side}")
    if mode == "stretch":
        return ImageFit(mode, (height, width), (side, side), (side, side))
    scale = side / (max(height, width) if mode == "pad" else min(height, width))
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
    if mode == "pad":
        scaled = (min(scaled[0], side), min(scaled[1], side))
        offset = ((side - scaled[0]) // 2, (side - scaled[1]) // 2)
    else:
        scaled = (max(scaled[0], side), max(scaled[1], side))
        offset = ((scaled[0] - side) // 2, (scaled[1] - side) // 2)
    return ImageFit(mode, (height, width), (side, side), scaled, offset)


def fit_image(image: torch.Tensor, side: int | None, mode: str = DEFAULT_FIT) -> tuple[torch.Tensor, ImageFit]:
    """(1, 1, H, W) float in [0, 1] -> ((1, 1, S, S), its ImageFit)."""
    fit = plan_fit(tuple(image.shape[-2:]), side, mode)
    return fit.apply(image), fit


__all__ = ["DEFAULT_FIT", "FIT_MODES", "ImageFit", "check_fit_mode", "fit_image", "plan_fit"]
