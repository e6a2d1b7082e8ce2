"""Finding labelers by name (`load_labeler`) and the CSV round trip.

Specs understood by `load_labeler`:

- ``"rules"``: the offline `RuleLabeler` (spaCy rules, negation, uncertainty).
- ``"chexbert:PATH/chexbert.pth"`` or ``"chexbert:PATH/chexbert.pth::TOKENIZER"``: CheXbert from the
  official checkpoint; TOKENIZER is a local bert-base-uncased folder or a hub id (the only case that
  contacts the hub); without it, the tokenizer beside the checkpoint or bert-base-uncased in the
  local Hugging Face cache.

Heavy libraries (spaCy, torch, transformers) are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cyclex.atomic_io import write_bytes_atomic
from cyclex.csv_text import DEFAULT_ENCODING, csv_bytes, read_csv_rows
from cyclex.findings import FINDINGS, FindingLabels
from cyclex.labelers.base import Labeler
from cyclex.labelers.report_text import strip_invisible_controls

logger = logging.getLogger(__name__)

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
        from cyclex.labelers.chexbert import CheXbertLabeler

        # no tokenizer named: beside the checkpoint or the local cache, never a download
        return CheXbertLabeler.from_checkpoint(checkpoint, tokenizer=tokenizer or None)
    if spec == "chexbert":
        raise ValueError("the chexbert labeler needs its checkpoint: use "
                         f"'{CHEXBERT_PREFIX}PATH/chexbert.pth[{TOKENIZER_SEPARATOR}TOKENIZER]'")
    raise ValueError(f"unknown labeler spec {spec!r}; expected {RULES_SPEC!r} or "
                     f"'{CHEXBERT_PREFIX}PATH/chexbert.pth[{TOKENIZER_SEPARATOR}TOKENIZER]'")


def read_report_column(csv_path: str | os.PathLike, column: str, *, encoding: str = DEFAULT_ENCODING) -> list[str]:
    """Read one text column of a CSV file as written: empty cells are '', the words NaN / None stay words.

    A UTF-8 byte-order mark is ignored, cells of any length are read, and text in another encoding
    than `encoding` raises `CsvEncodingError` (a `ValueError`) naming the file and line.
    """
    path = Path(csv_path)
    header, rows = read_csv_rows(path, encoding=encoding, what="reports file")
    if column not in header:
        found = ", ".join(header) or "none (empty file)"
        raise KeyError(f"reports file {str(path)!r} has no column {column!r}; its columns are: {found}")
    return [row[column] for row in rows]


def write_labels_csv(reports: list[str], labels: list[FindingLabels], out_path: str | os.PathLike,
                     *, report_column: str = "Report Impression") -> Path:
    """Write CheXpert-style labels atomically: the report column then the 14 findings.

    Cells hold the CheXpert codes 1 (positive), 0 (negative), -1 (uncertain) or nothing (blank).
    Report cells a spreadsheet would run as a formula (=, +, -, @ first) are written with a leading '.
    """
    if len(reports) != len(labels):
        raise ValueError(f"got {len(reports)} reports but {len(labels)} label rows")
    codes = {"positive": "1", "negative": "0", "uncertain": "-1", "blank": ""}
    rows = ([report, *(codes[row.states[f].value] for f in FINDINGS)]
            for report, row in zip(reports, labels, strict=True))
    return write_bytes_atomic(out_path, csv_bytes([report_column, *FINDINGS], rows, text_columns=[0]))


def label_csv(csv_path: str | os.PathLike, out_path: str | os.PathLike, *, column: str = "report",
              labeler: Labeler | str = RULES_SPEC, encoding: str = DEFAULT_ENCODING) -> list[FindingLabels]:
    """Label one column of a reports CSV and write the CheXpert-style labels CSV to `out_path`.

    Invisible format characters (bidi controls, zero-width spaces) are removed first, so the text
    labelled and written is the text a reader sees.
    """
    raw = read_report_column(csv_path, column, encoding=encoding)
    reports = [strip_invisible_controls(report) for report in raw]
    changed = sum(a != b for a, b in zip(raw, reports, strict=True))
    if changed:
        logger.warning("%s: removed invisible control characters (bidi, zero-width) from %d of %d reports",
                       csv_path, changed, len(reports))
    chosen = load_labeler(labeler) if isinstance(labeler, str) else labeler
    labels = chosen.label(reports)
    write_labels_csv(reports, labels, out_path, report_column=column)
    return labels
