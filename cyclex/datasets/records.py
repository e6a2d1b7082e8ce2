"""The record every loader returns: one study (or one image) with its files, report and labels."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cyclex.file_names import printable_text
from cyclex.findings import FindingLabels

SPLITS = ("train", "val", "test")
# Split spellings of the public data sets, mapped onto SPLITS.
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def normalise_split(value: object, *, source: str = "split") -> str | None:
    """'validate' / 'valid' / 'validation' -> 'val'; empty -> None; anything else is an error."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    if text not in _SPLIT_ALIASES:
        raise ValueError(f"{source}: unknown split {value!r}; expected one of {sorted(_SPLIT_ALIASES)}")
    return _SPLIT_ALIASES[text]


@dataclass
class XrayRecord:
    """One item of a data set.

    image_paths: one file per view (R2Gen's iu_xray has two views per study, most sets one).
    report: the ground-truth report text, if the set has one. labels: CheXpert-style labels, if any.
    split: "train" | "val" | "test" | None. meta: anything else the source carries (view, sex, ...).
    """

    id: str
    image_paths: list[Path]
    report: str | None = None
    labels: FindingLabels | None = None
    split: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image_paths:
            raise ValueError(f"record {self.id!r} has no image paths")
        self.image_paths = [Path(p) for p in self.image_paths]
        self.id = printable_text(str(self.id))  # ids of non-UTF-8 file names are written to JSON, HTML, CSV

    def missing_files(self) -> list[Path]:
        return [p for p in self.image_paths if not p.is_file()]


def check_files_exist(records: list[XrayRecord], source: str | os.PathLike, limit: int = 5) -> None:
    """Raise FileNotFoundError listing the first missing image files of `records`."""
    missing = [(r.id, p) for r in records for p in r.missing_files()]
    if missing:
        shown = ", ".join(f"{p} (record {rid})" for rid, p in missing[:limit])
        raise FileNotFoundError(f"{source}: {len(missing)} image files are missing, e.g. {shown}")
