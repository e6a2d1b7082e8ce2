"""The report-generator protocol every adapter implements.

Image convention shared by all of cyclex: a batch of grayscale X-rays is a float32 tensor of shape
(B, 1, H, W) with values in [0, 1]. Multi-view generators (R2Gen on iu_xray) take (B, V, 1, H, W);
given a single-view batch they repeat the view. The adapters' `generate` also take paths, PIL images
and numpy arrays (`cyclex.adapters.inputs.as_image_batch`, what `generate_in_batches` calls first) and
convert to what their model needs (RGB, resize, normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class GeneratorInfo:
    """What cyclex needs to know to feed a generator."""

    name: str  # how reports and run folders refer to it, e.g. "hf:/models/clean"
    input_size: tuple[int, int] | None = None  # (H, W) the model expects; None = any
    channels: int = 3  # channels the model consumes after conversion
    mean: tuple[float, ...] = field(default=(0.5,))  # normalisation applied by the adapter
    std: tuple[float, ...] = field(default=(0.5,))
    views_per_study: int = 1


class GeneratorError(RuntimeError):
    """A wrapped report generator failed or answered with something other than strings."""


@runtime_checkable
class ReportGenerator(Protocol):
    """Anything that turns a batch of X-rays into one report per image."""

    info: GeneratorInfo

    def generate(self, images: torch.Tensor) -> list[str]:
        """images: (B, 1, H, W) or (B, V, 1, H, W) float in [0, 1] -> B report strings."""
        ...


def check_reports(reports: object, expected: int, *, generator: str) -> list[str]:
    """Validate a generator's answer: a list of `expected` strings."""
    if not isinstance(reports, (list, tuple)):
        raise GeneratorError(f"generator {generator} returned {type(reports).__name__}, expected a list of strings")
    if len(reports) != expected:
        raise GeneratorError(f"generator {generator} returned {len(reports)} reports for {expected} images")
    bad = [i for i, r in enumerate(reports) if not isinstance(r, str)]
    if bad:
        raise GeneratorError(
            f"generator {generator} returned non-string reports at positions {bad[:5]} "
            f"(first: {type(reports[bad[0]]).__name__})"
        )
    return list(reports)
