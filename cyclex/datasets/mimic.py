"""MIMIC-CXR-JPG (Johnson et al. 2019) folders with their CSVs.

Layout under `root`: `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg` and the CSVs
`mimic-cxr-2.0.0-metadata.csv(.gz)` (dicom_id, subject_id, study_id, ViewPosition, ...),
`mimic-cxr-2.0.0-split.csv(.gz)` (dicom_id, study_id, subject_id, split = train/validate/test) and
`mimic-cxr-2.0.0-chexpert.csv(.gz)` (subject_id, study_id, the 14 CheXpert labels). Free-text
reports are not part of MIMIC-CXR-JPG; pass `reports_root` (MIMIC-CXR's `files/` folder of
`pXX/pSUBJECT/sSTUDY.txt`) to attach them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cyclex.datasets.chexpert import CHEXPERT_LABEL_COLUMNS, labels_from_row
from cyclex.datasets.records import XrayRecord, check_files_exist, normalise_split

MIMIC_PREFIX = "mimic-cxr-2.0.0"


def find_mimic_csv(root: Path, kind: str) -> Path | None:
    """`root/mimic-cxr-2.0.0-{kind}.csv.gz` or `.csv`, whichever exists."""
    for suffix in (".csv.gz", ".csv"):
        path = root / f"{MIMIC_PREFIX}-{kind}{suffix}"
        if path.is_file():
            return path
    return None


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, compression="infer", dtype={"dicom_id": str})
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(frame.columns)[:10]}")
    return frame


def mimic_image_path(root: Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    subject = f"p{int(subject_id)}"
    return root / "files" / subject[:3] / subject / f"s{int(study_id)}" / f"{dicom_id}.jpg"


def _report_text(reports_root: Path, subject_id: int, study_id: int) -> str | None:
    subject = f"p{int(subject_id)}"
    path = reports_root / subject[:3] / subject / f"s{int(study_id)}.txt"
    if not path.is_file():
        return None
    return re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace")).strip()


def read_mimic_cxr_jpg(root: str | os.PathLike, *, view_positions: Sequence[str] | None = None,
                       splits: Sequence[str] | None = None, reports_root: str | os.PathLike | None = None,
                       check_files: bool = True) -> list[XrayRecord]:
    """One record per image (DICOM id), with split, CheXpert labels of its study and its view.

    view_positions: keep only these ViewPosition values (e.g. ("PA", "AP")); None keeps all.
    splits: keep only these splits ("train", "val", "test"; MIMIC's "validate" is "val").
    """
    root = Path(root)
    metadata_path = find_mimic_csv(root, "metadata")
    if metadata_path is None:
        raise FileNotFoundError(f"{root}: {MIMIC_PREFIX}-metadata.csv(.gz) not found; expected the MIMIC-CXR-JPG layout")
    metadata = _read_csv(metadata_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    split_path = find_mimic_csv(root, "split")
    split_of: dict[str, str | None] = {}
    if split_path is not None:
        split_frame = _read_csv(split_path, ("dicom_id", "split"))
        split_of = {str(d): normalise_split(s, source=str(split_path))
                    for d, s in zip(split_frame["dicom_id"], split_frame["split"], strict=True)}
    labels_of: dict[tuple[int, int], dict] = {}
    chexpert_path = find_mimic_csv(root, "chexpert")
    label_columns: tuple[str, ...] = ()
    if chexpert_path is not None:
        chexpert = _read_csv(chexpert_path, ("subject_id", "study_id"))
        label_columns = tuple(c for c in CHEXPERT_LABEL_COLUMNS if c in chexpert.columns)
        for row in chexpert.to_dict("records"):
            labels_of[(int(row["subject_id"]), int(row["study_id"]))] = row
    wanted_views = {v.upper() for v in view_positions} if view_positions is not None else None
    wanted_splits = {normalise_split(s, source="splits") for s in splits} if splits is not None else None
    reports = Path(reports_root) if reports_root is not None else None

    records = []
    for row in metadata.to_dict("records"):
        view = row["ViewPosition"] if isinstance(row["ViewPosition"], str) else ""
        if wanted_views is not None and view.upper() not in wanted_views:
            continue
        dicom_id = str(row["dicom_id"])
        split = split_of.get(dicom_id)
        if wanted_splits is not None and split not in wanted_splits:
            continue
        subject_id, study_id = int(row["subject_id"]), int(row["study_id"])
        label_row = labels_of.get((subject_id, study_id))
        labels = (labels_from_row(label_row, label_columns, f"{chexpert_path}: study {study_id}")
                  if label_row is not None else None)
        records.append(XrayRecord(
            id=dicom_id,
            image_paths=[mimic_image_path(root, subject_id, study_id, dicom_id)],
            report=_report_text(reports, subject_id, study_id) if reports is not None else None,
            labels=labels,
            split=split,
            meta={"subject_id": subject_id, "study_id": study_id, "ViewPosition": view or None},
        ))
    if check_files:
        check_files_exist(records, root)
    return records
