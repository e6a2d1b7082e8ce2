"""A torch Dataset over XrayRecords, yielding images in cyclex's (.., 1, H, W) convention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from cyclex.datasets.images import read_image, resize_image
from cyclex.datasets.records import XrayRecord
from cyclex.findings import FINDINGS


def labels_tensor(record: XrayRecord) -> torch.Tensor:
    """(14,) float tensor of CheXpert codes in FINDINGS order: 1 / 0 / -1, NaN for blank or no labels."""
    if record.labels is None:
        return torch.full((len(FINDINGS),), float("nan"))
    codes = [record.labels[f].chexpert_code for f in FINDINGS]
    return torch.tensor([float("nan") if c is None else c for c in codes], dtype=torch.float32)


class XrayDataset(Dataset):
    """Items are dicts: image (1, H, W) or (V, 1, H, W) when views > 1, id, report ("" if none),
    labels (14,) CheXpert codes (see `labels_tensor`), index. The default collate gives (B, 1, H, W).

    views: views per item; a record with fewer files repeats its last view (R2Gen's iu_xray uses 2).
    """

    def __init__(self, records: Sequence[XrayRecord], size: int | tuple[int, int] = 64, views: int = 1) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.records = list(records)
        self.size = size
        self.views = views

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        paths = list(record.image_paths[: self.views])
        paths += [paths[-1]] * (self.views - len(paths))
        stack = torch.stack([torch.from_numpy(resize_image(read_image(p), self.size))[None] for p in paths])
        return {
            "image": stack[0] if self.views == 1 else stack,
            "id": record.id,
            "report": record.report or "",
            "labels": labels_tensor(record),
            "index": index,
        }
