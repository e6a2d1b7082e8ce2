"""Report generators that misbehave, for the reliability corpus (`python:benchmarks.hostile_generators:NAME`).

Each takes (B, 1, H, W) images in [0, 1] like a real generator. `heart_reports` is the well-behaved
one: "Cardiomegaly." when the image's centre is bright, so the rule labeler finds a finding to remove.
"""

from __future__ import annotations

import sys
import time

import torch


def heart_reports(images: torch.Tensor) -> list[str]:
    side = images.shape[-1]
    centre = images[:, 0, side // 3: 2 * side // 3, side // 3: 2 * side // 3].mean(dim=(1, 2))
    return ["Cardiomegaly. No effusion." if value > 0.5 else "No acute cardiopulmonary process." for value in centre]


def raises(images):
    raise RuntimeError("CUDA error: device-side assert triggered (a generator bug)")


def returns_none(images):
    return None


def wrong_count(images):
    return heart_reports(images)[:-1] or []


def non_strings(images):
    return [42 for _ in range(images.shape[0])]


def empty_strings(images):
    return ["" for _ in range(images.shape[0])]


def whitespace_strings(images):
    return ["   \n" for _ in range(images.shape[0])]


def exits(images):
    sys.exit(3)


def hangs(images):
    time.sleep(3600)
    return heart_reports(images)


def nan_text(images):
    return ["nan" for _ in range(images.shape[0])]


def hostile_html(images):
    """Reports a page must show as text: script tags, event handlers, a broken tag."""
    return ['Cardiomegaly. <script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'
            ' </table></div><b' for _ in range(images.shape[0])]


def formula_reports(images):
    """Reports a spreadsheet would run as formulas."""
    return ['=HYPERLINK("http://evil","Cardiomegaly")' for _ in range(images.shape[0])]


def huge_reports(images):
    return ["Cardiomegaly. " + "x" * 2_000_000 for _ in range(images.shape[0])]


def not_a_function():  # a factory that returns something that is not a generator
    return 17
