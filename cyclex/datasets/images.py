"""Reading X-ray image files into cyclex's convention: float32 (H, W) in [0, 1], bright = dense.

Handles 8- and 16-bit PNG, JPEG, TIFF/BMP (via Pillow) in grayscale, RGB, RGBA, palette modes,
and DICOM (via pydicom): the modality LUT (Rescale Slope / Intercept) is applied, then the first
VOI window (Window Center / Width, DICOM PS3.3 C.11.2.1.2 linear function) if the file has one,
else min-max scaling; MONOCHROME1 images are inverted so bone is bright as in MONOCHROME2.

Every failure (missing, empty, truncated, unreadable file, unsupported mode) raises
`ImageReadError` naming the file and what was expected.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + DICOM_SUFFIXES
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as Pillow's convert("L")


class ImageReadError(OSError):
    """An image file that cannot be turned into a grayscale X-ray; the message names the file."""


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _first_value(value: object) -> float:
    """Window Center/Width may be multi-valued; the first pair is the default view."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = list(value)[0]
    return float(value)


def dicom_to_float(ds, path: Path | str = "<dataset>") -> np.ndarray:
    """A pydicom Dataset -> float32 (H, W) in [0, 1] (modality LUT, VOI window, MONOCHROME1 inverted)."""
    try:
        raw = ds.pixel_array
    except Exception as err:  # pydicom raises many types for missing pixel data / codecs
        raise ImageReadError(f"{path}: DICOM pixel data cannot be decoded ({type(err).__name__}: {err})") from err
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{path}: DICOM has {frames} frames; expected a single-frame radiograph")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if raw.ndim == 3 and raw.shape[-1] == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
            if photometric != "RGB":
                from pydicom.pixels import convert_color_space

                raw = convert_color_space(raw, photometric, "RGB")
            scale = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
            return np.clip((raw.astype(np.float32) @ _LUMA) / scale, 0, 1).astype(np.float32)
        raise ImageReadError(f"{path}: DICOM PhotometricInterpretation {photometric!r} is not supported; "
                             "expected MONOCHROME1, MONOCHROME2 or RGB")
    if raw.ndim != 2:
        raise ImageReadError(f"{path}: DICOM pixel array has shape {raw.shape}; expected (rows, columns)")
    from pydicom.pixels import apply_modality_lut

    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is not None and width is not None and _first_value(width) >= 1:
        c, w = _first_value(center), _first_value(width)
        out = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) if w > 1 else (values > c - 0.5).astype(float)
    else:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError, struct.error) as err:
        raise ImageReadError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no PixelData element; expected an image")
    return dicom_to_float(ds, path)


# pixels: smaller images would be scaled up to a flat grey and explained or trained on as if they were X-rays
MIN_IMAGE_SIDE = 16


def pil_to_float(image: Image.Image, path: Path | str = "<image>") -> np.ndarray:
    """A Pillow image -> float32 (H, W) in [0, 1]; RGB(A) becomes luminance, alpha composites over black."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(image, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(f"{path}: 32-bit integer image with values in [{arr.min()}, {arr.max()}]; "
                                 "expected 8- or 16-bit intensities")
        return (arr / 65535.0).astype(np.float32)
    if mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ImageReadError(f"{path}: float image with values in [{arr.min()}, {arr.max()}]; expected [0, 1]")
        return arr
    if mode in ("LA", "La"):
        arr = np.asarray(image.convert("LA"), dtype=np.float32) / 255.0
        return arr[..., 0] * arr[..., 1]
    if mode in ("P", "PA", "RGBA", "RGBa"):
        image = image.convert("RGBA")
        arr = np.asarray(image, dtype=np.float32) / 255.0
        return (arr[..., :3] @ _LUMA) * arr[..., 3]
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return arr @ _LUMA
    raise ImageReadError(f"{path}: image mode {mode!r} is not supported; expected grayscale (L, I;16), RGB or RGBA")


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here
            image = ImageOps.exif_transpose(image)
            return pil_to_float(image, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{path}: not a readable image (expected PNG, JPEG, TIFF, BMP or DICOM)") from err
    except Image.DecompressionBombError as err:  # a header declaring billions of pixels: refused, not decoded
        raise ImageReadError(f"{path}: declares too many pixels to decode safely ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:  # truncated data, broken chunks
        raise ImageReadError(f"{path}: image data is corrupt or truncated ({err})") from err


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one X-ray file -> float32 (H, W) in [0, 1]. Raises ImageReadError naming the file."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except OSError as err:
        raise ImageReadError(f"{path}: cannot access file ({err})") from err
    if not path.is_file():
        raise ImageReadError(f"{path}: not a regular file")
    if stat.st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    try:
        image = _read_dicom(path) if _is_dicom(path) else _read_pil(path)
    except PermissionError as err:
        raise ImageReadError(f"{path}: permission denied") from err
    if image.ndim != 2 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{path}: decoded to shape {image.shape}; expected a non-empty 2-D image")
    if not np.isfinite(image).all():
        raise ImageReadError(f"{path}: decoded image contains NaN or infinite values")
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def _target_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    return h, w


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize (H, W) float32 to `size` (int or (H, W)); area averaging when shrinking, bilinear otherwise."""
    h, w = _target_hw(size)
    if image.shape == (h, w):
        return image
    shrink = h < image.shape[0] or w < image.shape[1]
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def load_image_batch(paths: Sequence[str | os.PathLike], size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Read and resize files -> float32 tensor (B, 1, H, W) in [0, 1].

    size=None keeps the native size, which must then be the same for every file.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a sequence of file paths, got a single path")
    if len(paths) == 0:
        raise ValueError("paths is empty: nothing to load")
    images = []
    for path in paths:
        image = read_image(path)
        images.append(resize_image(image, size) if size is not None else image)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass size= to resize them")
    return torch.from_numpy(np.stack(images)[:, None])
