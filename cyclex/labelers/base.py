"""The labeler protocol (report texts in, one `FindingLabels` per report out) and the input check
every labeler applies.

This module imports no labeler, so labelers and the registry can both import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from cyclex.findings import FindingLabels


@runtime_checkable
class Labeler(Protocol):
    """Turns free-text reports into CheXbert-style labels, batched.

    `label(reports)` returns exactly one `FindingLabels` per input report, in order.
    """

    def label(self, reports: Sequence[str]) -> list[FindingLabels]: ...


def check_report_texts(reports: Iterable[str], *, labeler: str) -> list[str]:
    """Return `reports` as a list after checking that every item is a `str`.

    A single string is refused (iterating it would label each character); `None` or any other
    non-string item raises a `TypeError` that names its position and type. Empty strings are valid:
    labelers return all-blank labels for them.
    """
    if isinstance(reports, (str, bytes)):
        raise TypeError(f"{labeler}: `reports` must be a sequence of report strings, not a single "
                        f"{type(reports).__name__}; wrap it in a list")
    try:
        items = list(reports)
    except TypeError:
        raise TypeError(f"{labeler}: `reports` must be a sequence of report strings, "
                        f"got {type(reports).__name__}") from None
    for position, report in enumerate(items):
        if not isinstance(report, str):
            raise TypeError(f"{labeler}: report at position {position} must be a str, "
                            f"got {type(report).__name__} ({report!r:.60})")
    return items
