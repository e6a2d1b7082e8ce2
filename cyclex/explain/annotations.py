"""Reading annotations into masks and maps at a given image size (seed 000 / seed 001 inputs).

Formats:
- binary mask PNGs (any nonzero pixel = inside), e.g. phantom masks `masks/ID__slug.png`;
- MS-CXR style box CSV: `dicom_id`, `category_name` or `label_text`, `x`, `y`, `w`, `h`,
  `image_width`, `image_height` (one row per box; several boxes per image and finding are unioned);
- REFLACX style ellipse CSV: `xmin`, `ymin`, `xmax`, `ymax` (ellipse bounding box in pixels of the
  original image), `certainty` (1-5), one boolean column per finding (REFLACX label names, mapped to
  ours where they match), an optional `dicom_id` / `image_id` column, optional `image_width` /
  `image_height` columns;
- REFLACX style chest box CSV: `xmin`, `ymin`, `xmax`, `ymax`;
- eye-tracking heatmaps as `.npy` or grayscale PNG -> (H, W) float maps in [0, 1].

Sizes are (H, W). Masks are (H, W) bool, maps (H, W) float64. Errors name the file and the column.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cyclex.findings import UnknownFindingError, canonical_finding, finding_slug

logger = logging.getLogger(__name__)

__all__ = [
    "BoxAnnotation",
    "EllipseAnnotation",
    "REFLACX_FINDING_NAMES",
    "read_mask_png",
    "resize_mask",
    "read_box_csv",
    "boxes_to_mask",
    "read_ellipse_csv",
    "ellipses_to_mask",
    "read_chest_box_csv",
    "read_heatmap",
    "resize_map",
    "finding_name",
    "AnnotationSet",
    "load_annotation_set",
]

# REFLACX label columns -> our canonical findings (labels without an equivalent keep their own name).
REFLACX_FINDING_NAMES: dict[str, str] = {
    "enlarged cardiac silhouette": "Cardiomegaly",
    "abnormal mediastinal contour": "Enlarged Cardiomediastinum",
    "widened mediastinum": "Enlarged Cardiomediastinum",
    "atelectasis": "Atelectasis",
    "consolidation": "Consolidation",
    "pulmonary edema": "Edema",
    "edema": "Edema",
    "pleural abnormality": "Pleural Other",
    "pleural effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "groundglass opacity": "Lung Opacity",
    "lung nodule or mass": "Lung Lesion",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "fracture": "Fracture",
    "acute fracture": "Fracture",
    "support devices": "Support Devices",
    "pneumonia": "Pneumonia",
}
_ELLIPSE_RESERVED = {"xmin", "ymin", "xmax", "ymax", "certainty", "dicom_id", "image_id", "id",
                     "image_width", "image_height", "eye_tracking_data_discarded"}


def finding_name(label: str) -> str:
    """Our canonical finding for an annotation label (CheXbert names, aliases, REFLACX names); the
    stripped label itself when it matches none."""
    key = " ".join(label.strip().lower().replace("_", " ").split())
    if key in REFLACX_FINDING_NAMES:
        return REFLACX_FINDING_NAMES[key]
    try:
        return canonical_finding(label)
    except UnknownFindingError:
        return label.strip()


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or min(int(s) for s in size) <= 0:
        raise ValueError(f"size must be (H, W) with positive values, got {size!r}")
    return int(size[0]), int(size[1])


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (H, W)."""
    import cv2

    height, width = _check_size(size)
    if mask.shape == (height, width):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def resize_map(map_: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Area-averaging (down) or bilinear (up) resize of a float map to (H, W)."""
    import cv2

    height, width = _check_size(size)
    if map_.shape == (height, width):
        return map_.astype(np.float64)
    shrinking = height < map_.shape[0] or width < map_.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(map_.astype(np.float32), (width, height), interpolation=interpolation).astype(np.float64)


def read_mask_png(path: str | os.PathLike, size: Sequence[int] | None = None) -> np.ndarray:
    """Binary mask from a PNG (nonzero = inside; RGB / RGBA reduced by max over channels) -> (H, W) bool."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 3:
        array = array.max(axis=2)
    mask = array > 0
    return resize_mask(mask, size) if size is not None else mask


def _read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation CSV not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as err:
        raise ValueError(f"annotation CSV {path}: not UTF-8 text (offset {err.start}); expected an MS-CXR box CSV "
                         "or a REFLACX ellipse CSV") from None
    except csv.Error as err:
        raise ValueError(f"annotation CSV {path}: not a valid CSV file ({err})") from None
    return rows


def _number(row: dict[str, str], column: str, path, line: int) -> float:
    try:
        return float(row[column])
    except KeyError:
        raise ValueError(f"{path}: missing column {column!r} (row {line})") from None
    except (TypeError, ValueError):
        raise ValueError(f"{path}: column {column!r} row {line} must be a number, got {row.get(column)!r}") from None


@dataclass(frozen=True)
class BoxAnnotation:
    """One box in pixels of an image of size (image_height, image_width)."""

    image_id: str
    finding: str
    x: float
    y: float
    w: float
    h: float
    image_width: float
    image_height: float


def read_box_csv(path: str | os.PathLike) -> list[BoxAnnotation]:
    """MS-CXR style boxes. Label column: `category_name`, else `label_text`; id column: `dicom_id`,
    else `image_id`."""
    rows = _read_csv(path)
    if not rows:
        return []
    columns = set(rows[0])
    label_column = next((c for c in ("category_name", "label_text", "finding") if c in columns), None)
    id_column = next((c for c in ("dicom_id", "image_id") if c in columns), None)
    if label_column is None or id_column is None:
        raise ValueError(f"{path}: a box CSV needs an id column (dicom_id or image_id) and a label column "
                         f"(category_name or label_text); found columns {sorted(columns)}")
    boxes = []
    for line, row in enumerate(rows, start=2):
        values = {c: _number(row, c, path, line) for c in ("x", "y", "w", "h", "image_width", "image_height")}
        if values["w"] <= 0 or values["h"] <= 0 or values["image_width"] <= 0 or values["image_height"] <= 0:
            raise ValueError(f"{path}: row {line} needs positive w, h, image_width, image_height, got {values}")
        boxes.append(BoxAnnotation(image_id=row[id_column].strip(), finding=finding_name(row[label_column]), **values))
    return boxes


def boxes_to_mask(boxes: Iterable[BoxAnnotation], size: Sequence[int]) -> np.ndarray:
    """Union of boxes rasterised at (H, W), coordinates scaled from each box's image size."""
    height, width = _check_size(size)
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        sx, sy = width / box.image_width, height / box.image_height
        x0, y0 = int(np.floor(box.x * sx)), int(np.floor(box.y * sy))
        x1, y1 = int(np.ceil((box.x + box.w) * sx)), int(np.ceil((box.y + box.h) * sy))
        mask[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = True
    return mask


@dataclass(frozen=True)
class EllipseAnnotation:
    """One REFLACX ellipse (its bounding box) with its certainty and the findings it marks."""

    image_id: str | None
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    certainty: float
    findings: tuple[str, ...]
    image_width: float | None = None
    image_height: float | None = None


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in {"true", "1", "1.0", "yes", "t"}


def read_ellipse_csv(path: str | os.PathLike) -> list[EllipseAnnotation]:
    """REFLACX style ellipses; every column not among the coordinates / certainty / ids is a finding flag."""
    rows = _read_csv(path)
    ellipses = []
    for line, row in enumerate(rows, start=2):
        coords = {c: _number(row, c, path, line) for c in ("xmin", "ymin", "xmax", "ymax")}
        if coords["xmax"] <= coords["xmin"] or coords["ymax"] <= coords["ymin"]:
            raise ValueError(f"{path}: row {line} needs xmax > xmin and ymax > ymin, got {coords}")
        certainty = _number(row, "certainty", path, line) if "certainty" in row else 5.0
        findings = tuple(finding_name(c) for c, v in row.items() if c not in _ELLIPSE_RESERVED and _truthy(v))
        image_id = next((row[c].strip() for c in ("dicom_id", "image_id", "id") if row.get(c)), None)
        width = _number(row, "image_width", path, line) if row.get("image_width") else None
        height = _number(row, "image_height", path, line) if row.get("image_height") else None
        ellipses.append(EllipseAnnotation(image_id, certainty=certainty, findings=findings,
                                          image_width=width, image_height=height, **coords))
    return ellipses


def ellipses_to_mask(ellipses: Iterable[EllipseAnnotation], size: Sequence[int], finding: str | None = None,
                     original_size: Sequence[int] | None = None, min_certainty: float = 1.0) -> np.ndarray:
    """Union of the ellipses (marking `finding`, or all when None, with certainty >= min_certainty)
    rasterised at size (H, W). Coordinates are in pixels of `original_size` (H, W), else of each
    ellipse's own image size columns, else already of `size`."""
    from skimage.draw import ellipse as draw_ellipse

    height, width = _check_size(size)
    mask = np.zeros((height, width), dtype=bool)
    for e in ellipses:
        if e.certainty < min_certainty or (finding is not None and finding_name(finding) not in e.findings):
            continue
        if original_size is not None:
            src_h, src_w = _check_size(original_size)
        elif e.image_width and e.image_height:
            src_h, src_w = e.image_height, e.image_width
        else:
            src_h, src_w = height, width
        sy, sx = height / src_h, width / src_w
        center_r, center_c = (e.ymin + e.ymax) / 2 * sy, (e.xmin + e.xmax) / 2 * sx
        radius_r, radius_c = (e.ymax - e.ymin) / 2 * sy, (e.xmax - e.xmin) / 2 * sx
        rr, cc = draw_ellipse(center_r - 0.5, center_c - 0.5, max(radius_r, 0.5), max(radius_c, 0.5), shape=(height, width))
        mask[rr, cc] = True
    return mask


def read_chest_box_csv(path: str | os.PathLike, size: Sequence[int] | None = None,
                       original_size: Sequence[int] | None = None) -> tuple[int, int, int, int]:
    """REFLACX chest box (first row's xmin, ymin, xmax, ymax) -> (x0, y0, x1, y1) in pixels of `size`
    (scaled from `original_size` when both are given)."""
    rows = _read_csv(path)
    if not rows:
        raise ValueError(f"{path}: no chest box row")
    values = [_number(rows[0], c, path, 2) for c in ("xmin", "ymin", "xmax", "ymax")]
    if size is not None and original_size is not None:
        (h, w), (oh, ow) = _check_size(size), _check_size(original_size)
        values = [values[0] * w / ow, values[1] * h / oh, values[2] * w / ow, values[3] * h / oh]
    x0, y0, x1, y1 = int(np.floor(values[0])), int(np.floor(values[1])), int(np.ceil(values[2])), int(np.ceil(values[3]))
    return x0, y0, x1, y1


def read_heatmap(path: str | os.PathLike, size: Sequence[int] | None = None) -> np.ndarray:
    """Eye-tracking heatmap from `.npy` (2-D) or an image -> (H, W) float64 min-max scaled to [0, 1]."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"heatmap file not found: {path}")
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False).astype(np.float64)
    else:
        with Image.open(path) as image:
            array = np.asarray(image.convert("F"), dtype=np.float64)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"{path}: heatmap must be 2-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: heatmap contains NaN or infinite values")
    span = array.max() - array.min()
    array = (array - array.min()) / span if span > 0 else np.zeros_like(array)
    return resize_map(array, size) if size is not None else array


class AnnotationSet:
    """Masks / heatmaps per (image_id, finding), read lazily at the size asked for.

    Built by `load_annotation_set` from a folder of mask PNGs (`ID__slug.png`), heatmaps
    (`ID__slug.npy` / `ID.npy`), a box CSV or an ellipse CSV.
    """

    def __init__(self) -> None:
        self._mask_files: dict[tuple[str, str], Path] = {}
        self._heatmap_files: dict[tuple[str, str | None], Path] = {}
        self._boxes: dict[tuple[str, str], list[BoxAnnotation]] = defaultdict(list)
        self._ellipses: dict[str, list[EllipseAnnotation]] = defaultdict(list)
        self.source: str = ""

    def mask(self, image_id: str, finding: str, size: Sequence[int]) -> np.ndarray | None:
        """(H, W) bool mask for the finding on the image, or None when not annotated."""
        finding = finding_name(finding)
        key = (image_id, finding)
        if key in self._mask_files:
            return read_mask_png(self._mask_files[key], size)
        if key in self._boxes:
            return boxes_to_mask(self._boxes[key], size)
        if image_id in self._ellipses:
            marked = [e for e in self._ellipses[image_id] if finding in e.findings]
            return ellipses_to_mask(marked, size) if marked else None
        return None

    def heatmap(self, image_id: str, finding: str, size: Sequence[int]) -> np.ndarray | None:
        """(H, W) float map in [0, 1] (finding-specific file first, then the image's), or None."""
        for key in ((image_id, finding_name(finding)), (image_id, None)):
            if key in self._heatmap_files:
                return read_heatmap(self._heatmap_files[key], size)
        return None

    def __len__(self) -> int:
        return len(self._mask_files) + len(self._heatmap_files) + len(self._boxes) + len(self._ellipses)


def _split_stem(stem: str, path: Path) -> tuple[str, str | None]:
    if "__" not in stem:
        return stem, None
    image_id, slug = stem.rsplit("__", 1)
    slugs = {finding_slug(f): f for f in _all_findings()}
    return image_id, slugs.get(slug, slug)


def _all_findings() -> tuple[str, ...]:
    from cyclex.findings import FINDINGS

    return FINDINGS


def load_annotation_set(path: str | os.PathLike) -> AnnotationSet:
    """Read annotations from a folder (mask PNGs `ID__slug.png`, heatmaps `.npy` / `ID__slug.npy`) or
    a CSV (box CSV when it has x, y, w, h; ellipse CSV when it has xmin, ymin, xmax, ymax)."""
    path = Path(path)
    annotations = AnnotationSet()
    annotations.source = str(path)
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix.lower() == ".png":
                image_id, finding = _split_stem(file.stem, file)
                if finding is None:
                    logger.warning("skipping %s: mask names must be ID__finding-slug.png", file)
                    continue
                annotations._mask_files[(image_id, finding)] = file
            elif file.suffix.lower() == ".npy":
                annotations._heatmap_files[_split_stem(file.stem, file)] = file
        if not len(annotations):
            raise ValueError(f"{path}: no annotation files (ID__slug.png masks or .npy heatmaps) found")
        return annotations
    if not path.is_file():
        raise FileNotFoundError(f"annotations not found: {path}")
    header = set(_read_csv(path)[0]) if _read_csv(path) else set()
    if {"x", "y", "w", "h"} <= header:
        for box in read_box_csv(path):
            annotations._boxes[(box.image_id, box.finding)].append(box)
    elif {"xmin", "ymin", "xmax", "ymax"} <= header:
        for ellipse in read_ellipse_csv(path):
            if ellipse.image_id is None:
                raise ValueError(f"{path}: an ellipse CSV used for a run needs a dicom_id or image_id column")
            annotations._ellipses[ellipse.image_id].append(ellipse)
    else:
        raise ValueError(f"{path}: not a box CSV (x, y, w, h, ...) nor an ellipse CSV (xmin, ymin, xmax, ymax, ...); "
                         f"columns: {sorted(header)}")
    return annotations
