"""The one configuration of tailored Stable Diffusion training (SPEC section 1, seeds 003 and 000).

Defaults are the papers' numbers where the papers give one (batch 8, lr 5e-5, p_uncond 0.1,
100k steps, T = 50 inversion steps, 100 validation images); the rest follow diffusers'
`examples/text_to_image/train_text_to_image.py`. The config is saved as JSON next to what it
produced (`training_config.json`), as nanoGPT saves its config in every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cyclex.atomic_io import write_json_atomic as _write_json_atomic

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
DEFAULT_WARMUP_FRACTION = 0.05  # of max_train_steps, when lr_warmup_steps is None
MAX_DEFAULT_WARMUP_STEPS = 500  # diffusers' examples' warm-up, reached from 10k steps on
PROMPT_SOURCES = ("generated", "ground-truth")


@dataclass
class TailoredTrainingConfig:
    """Hyper-parameters of UNet fine-tuning, checkpointing and checkpoint selection."""

    # -- optimisation (seed 003: batch 8, lr 5e-5, 100k steps) --
    train_batch_size: int = 8  # per process, as in the paper's single-GPU run
    learning_rate: float = 5e-5
    max_train_steps: int = 100_000  # optimizer updates
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant_with_warmup"  # any name `diffusers.optimization.get_scheduler` knows
    # None: 5 % of max_train_steps, at most diffusers' example default of 500 (the papers are silent);
    # a fixed 500 would keep a 40-step run at 8 % of its learning rate throughout
    lr_warmup_steps: int | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # -- classifier-free guidance training (seed 000): the prompt is replaced by "" with this rate --
    p_uncond: float = 0.1
    # -- model and memory --
    resolution: int = 512  # images are resized to resolution x resolution (SD v1.x trains at 512)
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 on GPU, "no" on CPU
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    precompute_latents: bool = True  # STYLE rule 19: encode VAE latents once (no augmentation is used)
    # None: latents are encoded in memory at every start; a folder: encoded once there, split between the
    # processes, resumable, and read back by later runs (latent_cache.py)
    latent_cache_dir: str | None = None
    latent_cache_shard_size: int = 1024  # images per latents-NNNNNN.safetensors (a multiple of 32)
    dataloader_num_workers: int = 0
    # -- checkpoints, logging, validation --
    checkpointing_steps: int = 5_000
    checkpoints_total_limit: int | None = 20  # oldest deleted first; the final step is always saved
    validation_steps: int = 1_000  # validation loss logged every N updates
    report_to: str = "tensorboard"  # any tracker accelerate supports, or "none"
    resume_from_checkpoint: str | None = "latest"  # "latest", a checkpoint folder name/path, or None
    seed: int = 0
    # -- validation split and checkpoint selection (seed 003: PSNR; seed 000: L1/L2 on 100 images) --
    validation_images: int = 100
    validation_fraction: float = 0.1  # the split takes min(validation_images, fraction * N) images
    num_inversion_steps: int = 50  # T of DDIM inversion for the reconstruction metrics
    selection_batch_size: int = 8

    def __post_init__(self) -> None:
        positive = ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                    "validation_steps", "num_inversion_steps", "resolution", "selection_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TailoredTrainingConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"TailoredTrainingConfig.p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.learning_rate <= 0:
            raise ValueError(f"TailoredTrainingConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"TailoredTrainingConfig.mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}"
            )
        if self.lr_warmup_steps is not None and (not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0):
            raise ValueError(f"TailoredTrainingConfig.lr_warmup_steps must be an integer >= 0 or None (5 % of "
                             f"max_train_steps, at most 500), got {self.lr_warmup_steps!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("TailoredTrainingConfig.checkpoints_total_limit must be >= 1 or None")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"TailoredTrainingConfig.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.validation_images < 1:
            raise ValueError("TailoredTrainingConfig.validation_images must be >= 1")
        if self.latent_cache_dir is not None and not self.precompute_latents:
            raise ValueError("TailoredTrainingConfig.latent_cache_dir needs precompute_latents=True (the cache holds "
                             "the precomputed latents)")
        if self.latent_cache_shard_size < 1 or self.latent_cache_shard_size % 32:
            raise ValueError("TailoredTrainingConfig.latent_cache_shard_size must be a positive multiple of 32, got "
                             f"{self.latent_cache_shard_size}")

    def resolved_warmup_steps(self) -> int:
        """lr warm-up steps: the set value, or 5 % of max_train_steps capped at 500 (scaled to the run)."""
        if self.lr_warmup_steps is not None:
            return int(self.lr_warmup_steps)
        return min(MAX_DEFAULT_WARMUP_STEPS, round(DEFAULT_WARMUP_FRACTION * self.max_train_steps))

    def resolved_mixed_precision(self) -> str:
        """"auto" -> bf16 / fp16 on CUDA, "no" on CPU; an explicit half precision on CPU is an error."""
        import torch

        if self.mixed_precision == "auto":
            if torch.cuda.is_available():
                return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return "no"
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'no' (or 'auto') on CPU")
        return self.mixed_precision

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TailoredTrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TailoredTrainingConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TailoredTrainingConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read training config {path}: {err}") from err
        return cls.from_dict(data)


def write_json_atomic(path: str | Path, data: object) -> Path:
    """JSON in the order the data has (configs read top to bottom), written atomically."""
    return _write_json_atomic(path, data, sort_keys=False)
