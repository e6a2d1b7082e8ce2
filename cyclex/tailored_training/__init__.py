"""Tailored Stable Diffusion: fine-tune SD's UNet on a report generator's own reports (seed 003).

    manifest = build_tailored_dataset(generator, images, RuleLabeler(), "data/")
    train_tailored(manifest, "base_sd/", "tailored/", TailoredTrainingConfig(max_train_steps=2000))
    select_checkpoints("tailored/")
    pipe = load_tailored_pipeline("tailored/", checkpoint="best_l2")

Multi-GPU / multi-node: `accelerate launch -m cyclex.tailored_training --manifest ... --base ... --out ...`.
"""

from cyclex.tailored_training.config import TailoredTrainingConfig
from cyclex.tailored_training.dataset import (
    EmptyDatasetError,
    ImageRecord,
    build_tailored_dataset,
    read_image_source,
    read_manifest,
)
from cyclex.tailored_training.output import load_tailored_pipeline, read_tailored_metadata
from cyclex.tailored_training.selection import ddim_reconstruct, reconstruction_errors, select_checkpoints
from cyclex.tailored_training.train import BaseModelError, TrainingResult, check_base_model, train_tailored

__all__ = [
    "BaseModelError",
    "EmptyDatasetError",
    "ImageRecord",
    "TailoredTrainingConfig",
    "TrainingResult",
    "build_tailored_dataset",
    "check_base_model",
    "ddim_reconstruct",
    "load_tailored_pipeline",
    "read_image_source",
    "read_manifest",
    "read_tailored_metadata",
    "reconstruction_errors",
    "select_checkpoints",
    "train_tailored",
]
