"""Data: the phantom world (synthetic chest X-rays with known truth) and loaders for real data sets.

Every loader returns `XrayRecord`s; `XrayDataset` turns them into (B, 1, H, W) float tensors in [0, 1].
"""

from cyclex.datasets.chexpert import CHEXPERT_LABEL_COLUMNS, read_chexpert_csv
from cyclex.datasets.folder import read_image_folder, read_phantom_records
from cyclex.datasets.images import ImageReadError, load_image_batch, read_image, resize_image
from cyclex.datasets.mimic import read_mimic_cxr_jpg
from cyclex.datasets.phantom import (
    DEFAULT_PREVALENCE,
    Phantom,
    PhantomConfig,
    ShortcutConfig,
    make_phantom,
    make_phantoms,
    read_phantom_folder,
    without_finding,
    write_phantom_folder,
)
from cyclex.datasets.phantom_findings import DRAWABLE as PHANTOM_FINDINGS
from cyclex.datasets.r2gen import read_r2gen_annotation
from cyclex.datasets.records import XrayRecord
from cyclex.datasets.xray_dataset import XrayDataset, labels_tensor

__all__ = [
    "CHEXPERT_LABEL_COLUMNS",
    "DEFAULT_PREVALENCE",
    "ImageReadError",
    "PHANTOM_FINDINGS",
    "Phantom",
    "PhantomConfig",
    "ShortcutConfig",
    "XrayDataset",
    "XrayRecord",
    "labels_tensor",
    "load_image_batch",
    "make_phantom",
    "make_phantoms",
    "read_chexpert_csv",
    "read_image",
    "read_image_folder",
    "read_mimic_cxr_jpg",
    "read_phantom_folder",
    "read_phantom_records",
    "read_r2gen_annotation",
    "resize_image",
    "without_finding",
    "write_phantom_folder",
]
