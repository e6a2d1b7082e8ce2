"""The labeler protocol: report texts in, one `FindingLabels` per report out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from cyclex.findings import FindingLabels


@runtime_checkable
class Labeler(Protocol):
    """Turns free-text reports into CheXbert-style labels, batched.

    `label(reports)` returns exactly one `FindingLabels` per input report, in order.
    """

    def label(self, reports: Sequence[str]) -> list[FindingLabels]: ...
