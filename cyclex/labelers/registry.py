"""Finding labelers by name (`load_labeler`) and the CSV round trip.

Specs understood by `load_labeler`:

- ``"rules"``: the offline `RuleLabeler` (spaCy rules, negation, uncertainty).
- ``"chexbert:PATH/chexbert.pth"`` or ``"chexbert:PATH/chexbert.pth::TOKENIZER"``: CheXbert from the
  official checkpoint; TOKENIZER is a local bert-base-uncased folder or a hub id
  (default ``bert-base-uncased``).

Heavy libraries (spaCy, torch, transformers) are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

from cyclex.findings import FINDINGS, FindingLabels
from cyclex.labelers.base import Labeler

RULES_SPEC = "rules"
CHEXBERT_PREFIX = "chexbert:"
TOKENIZER_SEPARATOR = "::"


def load_labeler(spec: str) -> Labeler:
    """Build a labeler from a spec string (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"labeler spec must be a non-empty string, got {spec!r}; "
                         f"expected {RULES_SPEC!r} or '{CHEXBERT_PREFIX}PATH.pth[{TOKENIZER_SEPARATOR}TOKENIZER]'")
    spec = spec.strip()
    if spec == RULES_SPEC:
        from cyclex.labelers.rules import RuleLabeler

        return RuleLabeler()
    if spec.startswith(CHEXBERT_PREFIX):
        checkpoint, _, tokenizer = spec[len(CHEXBERT_PREFIX):].partition(TOKENIZER_SEPARATOR)
        if not checkpoint:
            raise ValueError(f"labeler spec {spec!r} names no checkpoint; expected "
                             f"'{CHEXBERT_PREFIX}PATH/chexbert.pth[{TOKENIZER_SEPARATOR}TOKENIZER]'")
        if not Path(checkpoint).is_file():  # before importing torch and transformers
            raise FileNotFoundError(f"CheXbert checkpoint {checkpoint!r} does not exist "
                                    "(expected the official chexbert.pth)")
        from cyclex.labelers.chexbert import DEFAULT_TOKENIZER, CheXbertLabeler

        return CheXbertLabeler.from_checkpoint(checkpoint, tokenizer=tokenizer or DEFAULT_TOKENIZER)
    if spec == "chexbert":
        raise ValueError("the chexbert labeler needs its checkpoint: use "
                         f"'{CHEXBERT_PREFIX}PATH/chexbert.pth[{TOKENIZER_SEPARATOR}TOKENIZER]'")
    raise ValueError(f"unknown labeler spec {spec!r}; expected {RULES_SPEC!r} or "
                     f"'{CHEXBERT_PREFIX}PATH/chexbert.pth[{TOKENIZER_SEPARATOR}TOKENIZER]'")


def read_report_column(csv_path: str | os.PathLike, column: str) -> list[str]:
    """Read one text column of a CSV file; empty cells become empty strings."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"reports file {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            found = ", ".join(reader.fieldnames or []) or "none (empty file)"
            raise KeyError(f"reports file {str(path)!r} has no column {column!r}; its columns are: {found}")
        return [row[column] or "" for row in reader]


def write_labels_csv(reports: list[str], labels: list[FindingLabels], out_path: str | os.PathLike,
                     *, report_column: str = "Report Impression") -> Path:
    """Write CheXpert-style labels atomically: the report column then the 14 findings.

    Cells hold the CheXpert codes 1 (positive), 0 (negative), -1 (uncertain) or nothing (blank).
    """
    if len(reports) != len(labels):
        raise ValueError(f"got {len(reports)} reports but {len(labels)} label rows")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    codes = {"positive": "1", "negative": "0", "uncertain": "-1", "blank": ""}
    handle = tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", suffix=".tmp",
                                         delete=False, newline="", encoding="utf-8")
    try:
        with handle:
            writer = csv.writer(handle)
            writer.writerow([report_column, *FINDINGS])
            for report, row in zip(reports, labels, strict=True):
                writer.writerow([report, *(codes[row.states[f].value] for f in FINDINGS)])
        os.replace(handle.name, out)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return out


def label_csv(csv_path: str | os.PathLike, out_path: str | os.PathLike, *, column: str = "report",
              labeler: Labeler | str = RULES_SPEC) -> list[FindingLabels]:
    """Label one column of a reports CSV and write the CheXpert-style labels CSV to `out_path`."""
    reports = read_report_column(csv_path, column)
    chosen = load_labeler(labeler) if isinstance(labeler, str) else labeler
    labels = chosen.label(reports)
    write_labels_csv(reports, labels, out_path, report_column=column)
    return labels
