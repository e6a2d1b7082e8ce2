"""A plain folder of X-ray images, optionally described by a CSV, and phantom folders as records.

Without a CSV every image file under the folder (PNG, JPEG, TIFF, BMP, DICOM) becomes a record whose
id is its path relative to the folder, without suffix. With a CSV, each row names an image
(column `image`, `path`, `image_path`, `filename` or `file`, relative to the folder) and may carry a
report (`report`, `text`, `findings`), a split, and label columns named after findings
("Cardiomegaly", "Pleural Effusion", aliases accepted) holding 1 / 0 / -1 / blank or label names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cyclex.datasets.chexpert import labels_from_row
from cyclex.datasets.images import IMAGE_SUFFIXES
from cyclex.datasets.phantom import read_phantom_folder
from cyclex.datasets.records import XrayRecord, check_files_exist, normalise_split
from cyclex.findings import FindingLabels, UnknownFindingError, canonical_finding

IMAGE_COLUMNS = ("image", "path", "image_path", "filename", "file", "Path")
REPORT_COLUMNS = ("report", "text", "findings", "Report")
ID_COLUMNS = ("id", "image_id", "study_id", "dicom_id")


def _first_present(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in columns:
            return name
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _label_columns(columns: list[str]) -> dict[str, str]:
    found = {}
    for column in columns:
        try:
            finding = canonical_finding(column)
        except UnknownFindingError:
            continue
        found[column] = finding
    return found


# The marker every cyclex run folder holds (`cyclex.cycle.run_ownership.MARKER_NAME`; a test keeps them equal).
# Its images are cyclex's own outputs: a run written inside --images must not explain them on the next run.
CYCLEX_RUN_MARKER = ".cyclex-run.json"


def _inside_cyclex_run(path: Path, root: Path) -> bool:
    return any((parent / CYCLEX_RUN_MARKER).exists() for parent in path.parents if parent != root.parent
               and (parent == root or root in parent.parents))


def read_image_folder(folder: str | os.PathLike, csv_path: str | os.PathLike | None = None, *,
                      image_column: str | None = None, report_column: str | None = None,
                      check_files: bool = True) -> list[XrayRecord]:
    """Records of a folder of images (sorted by path), or of the rows of `csv_path`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: image folder not found")
    if csv_path is None:
        # a broken or looping symlink named like an image is kept: reading it fails, so it is listed as skipped
        files = sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink())
                       and p.suffix.lower() in IMAGE_SUFFIXES and not _inside_cyclex_run(p, folder))
        if not files:
            raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return [XrayRecord(id=str(p.relative_to(folder).with_suffix("")), image_paths=[p]) for p in files]

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: CSV not found")
    frame = pd.read_csv(csv_path, compression="infer", dtype=str, keep_default_na=False)
    columns = list(frame.columns)
    image_column = image_column or _first_present(columns, IMAGE_COLUMNS)
    if image_column is None or image_column not in columns:
        raise ValueError(f"{csv_path}: no image column; expected one of {IMAGE_COLUMNS} (found {columns})")
    report_column = report_column or _first_present(columns, REPORT_COLUMNS)
    if report_column is not None and report_column not in columns:
        raise ValueError(f"{csv_path}: report column {report_column!r} not found (found {columns})")
    id_column = _first_present(columns, ID_COLUMNS)
    split_column = _first_present(columns, ("split",))
    labels_by_column = _label_columns([c for c in columns if c not in (image_column, report_column)])

    records = []
    for index, row in enumerate(frame.to_dict("records")):
        where = f"{csv_path}: row {index + 2}"
        rel = row[image_column].strip()
        if not rel:
            raise ValueError(f"{where}: empty {image_column!r}")
        paths = [folder / p.strip() for p in rel.split(";") if p.strip()]  # ';' joins multiple views
        labels = None
        if labels_by_column:
            by_finding = {labels_by_column[c]: row[c] for c in labels_by_column}
            labels = labels_from_row(by_finding, tuple(by_finding), where)
        meta = {k: v for k, v in row.items()
                if k not in (image_column, report_column, id_column, split_column) and k not in labels_by_column}
        records.append(XrayRecord(
            id=row[id_column] if id_column else str(Path(rel.split(";")[0]).with_suffix("")),
            image_paths=paths,
            report=row[report_column] if report_column else None,
            labels=labels,
            split=normalise_split(row[split_column], source=where) if split_column else None,
            meta=meta,
        ))
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if record.id in seen:
            raise ValueError(f"{csv_path}: rows {seen[record.id] + 2} and {index + 2} have the same image id "
                             f"{record.id!r}; ids must be unique")
        seen[record.id] = index
    if check_files:
        check_files_exist(records, csv_path)
    return records


def read_phantom_records(folder: str | os.PathLike) -> list[XrayRecord]:
    """A folder written by `write_phantom_folder` as records (meta keeps masks, chest_box, shortcut, ...)."""
    records = []
    for item in read_phantom_folder(folder):
        meta = {k: v for k, v in item.items() if k not in ("id", "image", "report", "labels")}
        records.append(XrayRecord(id=item["id"], image_paths=[Path(item["image"])], report=item["report"],
                                  labels=FindingLabels.from_dict(item["labels"]), split=item.get("split"),
                                  meta=meta))
    return records
