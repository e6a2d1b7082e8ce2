"""R2Gen's `annotation.json` (Chen et al. 2020; also used by R2GenCMN) for iu_xray and mimic_cxr.

Layout: `{"train": [...], "val": [...], "test": [...]}`. iu_xray entries carry `id`, `report`,
`image_path: [view0, view1]`, `split`; mimic_cxr entries add `study_id` and `subject_id` and have one
image. Image paths are relative to the image directory (R2Gen's `--image_dir`, by default the
`images/` folder beside the annotation file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cyclex.datasets.records import SPLITS, XrayRecord, check_files_exist, normalise_split

R2GEN_DATASETS = ("iu_xray", "mimic_cxr")
_VIEWS = {"iu_xray": 2, "mimic_cxr": 1}


def _detect_dataset(entries: list[dict]) -> str:
    for entry in entries:
        return "mimic_cxr" if "study_id" in entry or len(entry.get("image_path", [])) == 1 else "iu_xray"
    return "iu_xray"


def read_r2gen_annotation(ann_path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                          dataset: str | None = None, splits: tuple[str, ...] = SPLITS,
                          check_files: bool = True) -> list[XrayRecord]:
    """Records of an R2Gen annotation file, in file order, for the requested splits.

    dataset: "iu_xray" | "mimic_cxr" | None (detected: mimic entries carry study_id and one image).
    check_files: raise FileNotFoundError when image files are missing.
    """
    ann_path = Path(ann_path)
    try:
        data = json.loads(ann_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{ann_path}: R2Gen annotation file not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or not set(data) & set(SPLITS):
        raise ValueError(f"{ann_path}: expected a JSON object with keys 'train', 'val', 'test' (R2Gen layout)")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"splits {bad} are not R2Gen splits; expected a subset of {SPLITS}")
    if dataset is not None and dataset not in R2GEN_DATASETS:
        raise ValueError(f"dataset must be one of {R2GEN_DATASETS} or None, got {dataset!r}")
    root = Path(image_dir) if image_dir is not None else ann_path.parent / "images"
    all_entries = [e for s in SPLITS for e in (data.get(s) or [])]
    dataset = dataset or _detect_dataset(all_entries)
    records = []
    for split in splits:
        entries = data.get(split) or []
        if not isinstance(entries, list):
            raise ValueError(f"{ann_path}: '{split}' must be a list of entries, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            where = f"{ann_path}: {split}[{index}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
            missing = [k for k in ("id", "report", "image_path") if k not in entry]
            if missing:
                raise ValueError(f"{where}: missing fields {missing}")
            paths = entry["image_path"]
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
                raise ValueError(f"{where}: image_path must be a non-empty list of strings, got {paths!r}")
            if len(paths) < _VIEWS[dataset]:
                raise ValueError(f"{where}: {dataset} needs {_VIEWS[dataset]} image paths, got {len(paths)}")
            if not isinstance(entry["report"], str):
                raise ValueError(f"{where}: report must be a string, got {type(entry['report']).__name__}")
            meta = {"dataset": dataset}
            for key in ("study_id", "subject_id"):
                if key in entry:
                    meta[key] = entry[key]
            records.append(XrayRecord(
                id=str(entry["id"]),
                image_paths=[root / p for p in paths],
                report=entry["report"],
                split=normalise_split(entry.get("split", split), source=where),
                meta=meta,
            ))
    if check_files:
        check_files_exist(records, ann_path)
    return records
