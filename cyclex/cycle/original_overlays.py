"""Overlays of a fitted query's maps and frame on the query as it came (its original size).

The engine works on the query fitted to the tailored SD's side (`cyclex.cycle.image_fit`); a reader
of a 2400 x 1970 X-ray wants the evidence on that image. For items whose query was resized, padded or
cropped, the run folder writes beside the S x S files:

* `difference_original.png`: the positive difference map brought back (bilinear) on the original query;
* `frame_original.png`: the frame's mask brought back (nearest), its contours redrawn there.
"""

from __future__ import annotations

from pathlib import Path

from cyclex.atomic_io import write_png_atomic
from cyclex.explain.overlays import draw_frame, normalize_map, show_map_on_image


def write_original_overlays(out: Path, item_dir: Path, result) -> dict[str, Path]:
    """Write the two overlays of `result` (a CycleResult with `original` and `fit`) under out / item_dir.

    Returns {"difference_original": relative path, "frame_original": relative path}; nothing when
    the query went in as it came (result.original is None).
    """
    if result.original is None or result.fit is None:
        return {}
    fit = result.fit
    files = {"difference_original": Path(item_dir) / "difference_original.png",
             "frame_original": Path(item_dir) / "frame_original.png"}
    positive = normalize_map(fit.to_original(result.positive)).clip(0, 1)
    write_png_atomic(out / files["difference_original"], show_map_on_image(result.original, positive))
    thickness = max(1, round(max(result.original.shape) / 256))  # contours stay visible on large films
    write_png_atomic(out / files["frame_original"],
                     draw_frame(result.original, fit.frame_to_original(result.frame), thickness=thickness))
    return files
