"""Checkpoint selection by DDIM reconstruction (seed 003: best PSNR; seed 000: best L1 and best L2).

For every kept checkpoint, each validation image is DDIM-inverted (eta = 0, guidance 1) with the
structured prompt of its generated report over T = 50 steps, regenerated from the inverted noise with
the same prompt, decoded, and compared with the image:
PSNR = 10 log10(1 / MSE), L1 = mean |x - x_hat|, L2 = sqrt(mean (x - x_hat)^2) (RMSE on [0, 1], the
metric core's pixel L2), each averaged over the images. `selection.json` names the best checkpoint of
each, and the pipeline folder's `unet/` becomes the best-PSNR one (what CVLM uses).

Inversion and regeneration are the engine's `LatentDiffusion.ddim_invert / ddim_sample` (contract C5),
the same code the cyclic engine makes counterfactuals with.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from cyclex.tailored_training.config import TailoredTrainingConfig, write_json_atomic
from cyclex.tailored_training.dataset import load_gray_image, read_manifest
from cyclex.tailored_training.output import SELECTION_NAME
from cyclex.tailored_training.train import checkpoint_step, list_checkpoints

logger = logging.getLogger(__name__)


@torch.no_grad()
def ddim_reconstruct(pipe, images: torch.Tensor, prompts: list[str], num_inversion_steps: int = 50) -> torch.Tensor:
    """Invert `images` (B, 1, H, W) in [0, 1] with DDIM under `prompts`, regenerate, decode -> (B, 1, H, W) [0, 1].

    pipe: a StableDiffusionPipeline. Guidance 1 (conditional prediction only) in both directions, with
    the engine's `LatentDiffusion` (DDIMInverseScheduler then DDIMScheduler on the same noise levels).
    """
    from cyclex.counterfactuals.diffusion import LatentDiffusion

    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (B, 1, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    diffusion = LatentDiffusion(pipe, num_inference_steps=num_inversion_steps)
    cond = diffusion.encode_prompts(list(prompts))
    noise = diffusion.ddim_invert(diffusion.encode_images(images), cond, guidance=1.0)[-1]
    return diffusion.decode_latents(diffusion.ddim_sample(noise, cond, guidance=1.0))


def reconstruction_errors(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB, data range 1), L1 (mean absolute) and L2 (RMSE) of (B, 1, H, W) images in [0, 1]."""
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstruction.shape)}")
    diff = (original.float() - reconstruction.float()).flatten(1)
    mse = diff.pow(2).mean(dim=1)
    return {"psnr": 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12)), "l1": diff.abs().mean(dim=1), "l2": mse.sqrt()}


def _validation_rows(output_dir: Path) -> list[dict]:
    split_path = output_dir / "split.json"
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path} is missing: train with train_tailored first")
    split = json.loads(split_path.read_text())
    rows = {r["id"]: r for r in read_manifest(split["manifest"])}
    chosen = [rows[i] for i in split["validation"] if i in rows]
    if not chosen:
        raise ValueError(f"{split_path} names no validation image; raise validation_fraction or add images")
    return chosen


def select_checkpoints(output_dir: str | Path, *, num_inversion_steps: int | None = None,
                       validation_rows: list[dict] | None = None, device=None, batch_size: int | None = None,
                       update_pipeline: bool = True) -> dict:
    """Score every checkpoint by DDIM reconstruction of the validation split; write `selection.json`.

    validation_rows: manifest rows (image, generated_prompt or prompt); default: the split of training.
    Returns {"best_psnr", "best_l1", "best_l2", "final" (checkpoint subfolders), "metrics": {subfolder:
    {"psnr", "l1", "l2"}}, "num_inversion_steps", "n_validation"}. With update_pipeline, the
    best-PSNR UNet is copied into the folder's `unet/`.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from cyclex.tailored_training.train import load_base_components

    output_dir = Path(output_dir)
    config_path = output_dir / "training_config.json"
    config = TailoredTrainingConfig.load(config_path) if config_path.is_file() else TailoredTrainingConfig()
    steps = num_inversion_steps or config.num_inversion_steps
    batch_size = batch_size or config.selection_batch_size
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{output_dir} has no checkpoints/checkpoint-NNNNNN folders to select from")
    rows = validation_rows if validation_rows is not None else _validation_rows(output_dir)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    parts = load_base_components(output_dir)  # the saved pipeline's frozen VAE / text encoder / tokenizer
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=parts["noise_scheduler"], safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    ).to(device)
    images = torch.stack([torch.from_numpy(load_gray_image(r["image"], config.resolution))[None] for r in rows])
    prompts = [r.get("generated_prompt") or r["prompt"] for r in rows]

    metrics: dict[str, dict[str, float]] = {}
    for checkpoint in checkpoints:
        pipe.unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").to(device).eval()
        scores: dict[str, list[torch.Tensor]] = {"psnr": [], "l1": [], "l2": []}
        for start in range(0, len(rows), batch_size):
            batch = images[start:start + batch_size].to(device)
            recon = ddim_reconstruct(pipe, batch, prompts[start:start + batch_size], steps)
            for key, value in reconstruction_errors(batch, recon).items():
                scores[key].append(value.cpu())
        name = str(checkpoint.relative_to(output_dir))
        metrics[name] = {key: float(torch.cat(v).mean()) for key, v in scores.items()}
        logger.info("%s: PSNR %.2f dB, L1 %.4f, L2 %.4f", name, *metrics[name].values())

    names = list(metrics)
    selection = {
        "best_psnr": max(names, key=lambda n: metrics[n]["psnr"]),
        "best_l1": min(names, key=lambda n: metrics[n]["l1"]),
        "best_l2": min(names, key=lambda n: metrics[n]["l2"]),
        "final": str(max(checkpoints, key=checkpoint_step).relative_to(output_dir)),
        "metrics": metrics,
        "num_inversion_steps": steps,
        "n_validation": len(rows),
    }
    if update_pipeline and (output_dir / "model_index.json").is_file():
        _install_unet(output_dir / selection["best_psnr"] / "unet", output_dir / "unet")
    write_json_atomic(output_dir / SELECTION_NAME, selection)
    return selection


def _install_unet(source: Path, target: Path) -> None:
    """Replace `target` by a copy of `source` (copy beside, then swap)."""
    staging = target.with_name(target.name + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
