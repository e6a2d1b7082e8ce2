"""Report labelers: free-text reports in, CheXbert-style `FindingLabels` out.

`RuleLabeler` (offline spaCy rules, the default) and `CheXbertLabeler` (the official CheXbert
checkpoint on transformers) are imported lazily, so importing this package loads neither spaCy nor
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cyclex.labelers.base import Labeler, check_report_texts
from cyclex.labelers.registry import label_csv, load_labeler

if TYPE_CHECKING:
    from cyclex.labelers.chexbert import CheXbertLabeler
    from cyclex.labelers.rules import RuleLabeler

__all__ = ["CheXbertLabeler", "Labeler", "RuleLabeler", "check_report_texts", "label_csv", "load_labeler"]

_LAZY = {"RuleLabeler": "cyclex.labelers.rules", "CheXbertLabeler": "cyclex.labelers.chexbert"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
