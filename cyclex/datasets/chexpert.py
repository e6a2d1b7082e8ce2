"""CheXpert (Irvin et al. 2019) CSVs: `train.csv` / `valid.csv` of CheXpert-v1.0(-small).

Columns: Path ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"), Sex, Age,
Frontal/Lateral, AP/PA, then the 14 observations with 1.0 (positive), 0.0 (negative), -1.0
(uncertain) or blank. Paths are relative to the folder that holds `CheXpert-v1.0-small/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cyclex.datasets.records import XrayRecord, check_files_exist
from cyclex.findings import FINDINGS, FindingLabels, LabelState

CHEXPERT_LABEL_COLUMNS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
assert set(CHEXPERT_LABEL_COLUMNS) == set(FINDINGS)
_META_COLUMNS = ("Sex", "Age", "Frontal/Lateral", "AP/PA")


def labels_from_row(row: dict, columns: tuple[str, ...], source: str) -> FindingLabels:
    """Parse the label columns of one CSV row (1 / 0 / -1 / blank) into FindingLabels."""
    states = {}
    for column in columns:
        try:
            states[column] = LabelState.parse(row.get(column))
        except ValueError as err:
            raise ValueError(f"{source}: column {column!r}: {err}") from None
    return FindingLabels(states)


def _split_from_name(csv_path: Path) -> str | None:
    stem = csv_path.name.lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith("valid"):
        return "val"
    if stem.startswith("test"):
        return "test"
    return None


def _resolve(root: Path, csv_path: Path, rel: str) -> Path:
    candidate = root / rel
    if candidate.exists():
        return candidate
    # The CSV sits inside CheXpert-v1.0-small/: drop the leading folder name.
    parts = Path(rel).parts
    alt = csv_path.parent / Path(*parts[1:]) if len(parts) > 1 else candidate
    return alt if alt.exists() else candidate


def read_chexpert_csv(csv_path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                      frontal_only: bool = False, check_files: bool = True) -> list[XrayRecord]:
    """One record per row (image). root defaults to the parent of the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: CheXpert CSV not found")
    frame = pd.read_csv(csv_path, dtype={"Path": str}, keep_default_na=True)
    if "Path" not in frame.columns:
        raise ValueError(f"{csv_path}: no 'Path' column; expected CheXpert columns Path, Sex, Age, ... "
                         f"(found {list(frame.columns)[:8]})")
    label_columns = tuple(c for c in CHEXPERT_LABEL_COLUMNS if c in frame.columns)
    if not label_columns:
        raise ValueError(f"{csv_path}: none of the 14 CheXpert label columns found ({CHEXPERT_LABEL_COLUMNS})")
    root = Path(root) if root is not None else csv_path.parent.parent
    split = _split_from_name(csv_path)
    records = []
    for index, row in enumerate(frame.to_dict("records")):
        rel = row["Path"]
        if not isinstance(rel, str) or not rel.strip():
            raise ValueError(f"{csv_path}: row {index + 2}: empty Path")
        if frontal_only and str(row.get("Frontal/Lateral", "Frontal")).lower() != "frontal":
            continue
        meta = {c: row[c] for c in _META_COLUMNS if c in row and row[c] == row[c]}
        parts = Path(rel).parts
        meta.update({"patient": next((p for p in parts if p.startswith("patient")), None),
                     "study": next((p for p in parts if p.startswith("study")), None)})
        records.append(XrayRecord(
            id=str(Path(rel).with_suffix("")),
            image_paths=[_resolve(root, csv_path, rel)],
            labels=labels_from_row(row, label_columns, f"{csv_path}: row {index + 2}"),
            split=split,
            meta=meta,
        ))
    if check_files:
        check_files_exist(records, csv_path)
    return records
