"""Fine-tune the UNet of a Stable Diffusion pipeline on a generator's own reports (seed 003).

Read top to bottom, like diffusers' `examples/text_to_image/train_text_to_image.py`, whose structure
this follows: accelerator -> data and validation split -> models (VAE and text encoder frozen) ->
optimizer and lr schedule -> latents -> prepare -> resume -> loop -> final save.

The loss is the latent diffusion loss `E || eps - eps_theta(z_t, t, tau(y)) ||^2` (seed 003) with the
prompt replaced by "" at rate p_uncond = 0.1 so that classifier-free guidance works at inference
(seed 000). X-rays enter the 3-channel SD VAE the way SD fine-tunes on X-rays do (RoentGen):
the gray channel is replicated three times and scaled from [0, 1] to [-1, 1]. Latents are the VAE
posterior mean times `vae.config.scaling_factor` (deterministic, the same encoding the inversion
uses); with no augmentation (X-rays are not flipped: laterality matters) pre-encoding them once is
exact (STYLE rule 19).

Exact resume: model, optimizer, lr scheduler and RNG states are restored by `accelerator.load_state`;
the data order of every epoch is a fixed function of (seed, epoch); the noise, timesteps and prompt
dropout of every batch come from a generator seeded by (seed, epoch, batch index, process index);
the batches already seen in the resumed epoch are skipped with `accelerator.skip_first_batches`.

Kill-safe checkpoints: a checkpoint is written to `checkpoint-NNNNNN.partial/` and renamed to
`checkpoint-NNNNNN/` once every process has saved its part, so a kill mid-save never leaves a
half-written folder under a checkpoint's name; the next run removes the `.partial` folder. A
checkpoint folder that still lacks a part (left by a cyclex before this rule) is skipped with a
warning, and the run resumes from the latest complete one. Old checkpoints beyond
`checkpoints_total_limit` are deleted after a save succeeded, never before.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cyclex.atomic_io import remove_stale_temp_files
from cyclex.tailored_training.config import TailoredTrainingConfig, write_json_atomic
from cyclex.tailored_training.dataset import TailoredImageDataset, read_manifest
from cyclex.tailored_training.run_identity import check_training_run, training_identity

logger = logging.getLogger(__name__)

BASE_PARTS = {  # subfolder -> a file that must be in it
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json", "tokenizer_config.json"),
    "scheduler": ("scheduler_config.json",),
}
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written (or whose save was killed)
REPLACED_SUFFIX = ".replaced"  # a checkpoint of the same step moved aside while the new one takes its name
# What a finished checkpoint holds (accelerate's save_state plus our UNet hook): model, optimizer,
# lr scheduler and the main process's RNG state; UNet weights are safetensors or (older) .bin.
CHECKPOINT_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "unet/config.json")
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class BaseModelError(ValueError):
    """The base Stable Diffusion model folder or hub id cannot provide the needed parts."""


# ----------------------------------------------------------------------------------------------------
# Small pieces the loop (and the plain benchmark loop) use
# ----------------------------------------------------------------------------------------------------


def check_base_model(base: str | Path) -> Path | str:
    """A local diffusers folder with every part, or a hub id; a folder missing parts is a clear error."""
    path = Path(base)
    if path.is_dir():
        missing = []
        for part, files in BASE_PARTS.items():
            folder = path / part
            if not folder.is_dir() or not any((folder / f).is_file() for f in files):
                missing.append(f"{part}/ (needs {' or '.join(files)})")
        if missing:
            raise BaseModelError(
                f"base model folder {path} is missing parts: {', '.join(missing)}; expected a "
                "StableDiffusionPipeline.save_pretrained folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            )
        return path
    text = str(base)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise BaseModelError(f"base model {text!r} is neither an existing diffusers folder nor a hub id (owner/name)")
    return text


def load_base_components(base: str | Path) -> dict:
    """unet, vae, text_encoder, tokenizer, noise_scheduler (DDPM, for training) of a base SD."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = check_base_model(base)
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            "noise_scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        }
    except (OSError, ValueError) as err:
        raise BaseModelError(f"cannot load the base Stable Diffusion parts from {source}: {err}") from err


def xray_to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1]: gray replicated to RGB (RoentGen's recipe)."""
    return images.repeat(1, 3, 1, 1) * 2.0 - 1.0


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) [0, 1] -> (VAE posterior mean - shift) * scaling_factor, (B, C, H/f, W/f)."""
    pixels = xray_to_vae_input(images).to(device=vae.device, dtype=vae.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def batch_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded by a tuple of ints: the randomness of one batch, independent of history."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.Generator(device=device).manual_seed(seed)


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Latent diffusion loss `|| target - unet(z_t, t, c) ||^2` with z_t = add_noise(z_0, eps, t), t ~ U{0..T-1}.

    latents: (B, C, h, w) scaled VAE latents; encoder_hidden_states: (B, L, D). target is eps (or v for
    v-prediction schedulers, as diffusers' example does).
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def drop_prompts(input_ids: torch.Tensor, empty_ids: torch.Tensor, p_uncond: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Replace each row of input_ids (B, L) by the empty prompt's ids with probability p_uncond."""
    drop = torch.rand(input_ids.shape[0], generator=generator, device=generator.device) < p_uncond
    drop = drop.to(input_ids.device)
    return torch.where(drop[:, None], empty_ids.to(input_ids.device)[None], input_ids)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A random order of 0..n-1 that is a fixed function of (seed, epoch), so resume sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class LatentPromptDataset(torch.utils.data.Dataset):
    """Pre-encoded latents (N, C, h, w) with token ids (N, L)."""

    def __init__(self, latents: torch.Tensor, input_ids: torch.Tensor):
        self.latents, self.input_ids = latents, input_ids

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        return {"latents": self.latents[index], "input_ids": self.input_ids[index], "index": index}


class ImagePromptDataset(torch.utils.data.Dataset):
    def __init__(self, images: TailoredImageDataset, input_ids: torch.Tensor):
        self.images, self.input_ids = images, input_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        item = self.images[index]
        return {"pixel_values": item["pixel_values"], "input_ids": self.input_ids[index], "index": index}


def split_validation(rows: list[dict], config: TailoredTrainingConfig) -> tuple[list[dict], list[dict]]:
    """A seeded validation split of min(validation_images, fraction * N) rows (none when N < 2)."""
    n_val = min(config.validation_images, int(config.validation_fraction * len(rows)))
    if n_val < 1:
        return list(rows), []
    order = np.random.default_rng(config.seed).permutation(len(rows))
    val_idx = set(order[:n_val].tolist())
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def _numbered_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def missing_checkpoint_parts(path: str | Path) -> list[str]:
    """The parts a checkpoint folder lacks (empty: complete), e.g. ["optimizer.bin"] after a killed save."""
    path = Path(path)
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    for unet in ("unet", "unet_train"):  # unet_train: the raw weights of an EMA run
        if (unet == "unet" or (path / unet).exists()) and not any((path / unet / w).is_file() for w in UNET_WEIGHTS):
            missing.append(f"{unet}/{UNET_WEIGHTS[0]}")
    return missing


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints/checkpoint-NNNNNN folders, oldest (smallest step) first.

    Incomplete ones (a save killed before this cyclex wrote checkpoints under a temporary name) are
    left out with a warning naming what they lack.
    """
    complete = []
    for path in _numbered_checkpoints(output_dir):
        missing = missing_checkpoint_parts(path)
        if missing:
            logger.warning("skipping incomplete checkpoint %s (missing %s: its save was interrupted)", path,
                           ", ".join(missing))
        else:
            complete.append(path)
    return complete


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


def _remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete what killed saves left (main process, before training): `checkpoint-NNNNNN.partial` and
    `.replaced` folders. A .partial folder may look whole, but a file in it may be cut short: not trusted."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        suffix = next((x for x in (PARTIAL_SUFFIX, REPLACED_SUFFIX) if path.name.endswith(x)), None)
        if (suffix is None or not path.name.startswith(CHECKPOINT_PREFIX) or path.is_symlink() or not path.is_dir()
                or not path.name[len(CHECKPOINT_PREFIX):-len(suffix)].isdigit()):
            continue
        logger.warning("removing %s, left by a checkpoint save that was interrupted", path)
        shutil.rmtree(path)


def _prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints so that at most `keep` remain (called after a save)."""
    if keep is None:
        return
    existing = list_checkpoints(output_dir)
    for old in existing[: max(0, len(existing) - keep)]:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", old, keep)
        shutil.rmtree(old)


def _resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        path = output_dir / CHECKPOINTS_DIR / resume
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {resume!r} not found (looked in {output_dir / CHECKPOINTS_DIR})")
    missing = missing_checkpoint_parts(path)
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}: its save was "
                                "interrupted); resume from another one, or from 'latest' to take the newest complete one")
    return path


@dataclass
class TrainingResult:
    output_dir: Path
    global_step: int
    images_per_s: float  # training throughput of the steps run in this call (all processes)
    last_loss: float
    checkpoints: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def train_tailored(
    manifest: str | Path,
    base: str | Path,
    output_dir: str | Path,
    config: TailoredTrainingConfig | None = None,
    *,
    generator_spec: str | None = None,
    overwrite: bool = False,
) -> TrainingResult:
    """Fine-tune the UNet of `base` on (image, prompt) rows of `manifest`; write the C4 folder to `output_dir`.

    The folder is a `StableDiffusionPipeline` (UNet = final weights until `select_checkpoints` puts the
    best-PSNR ones there) plus `cyclex_tailored.json`, `training_config.json`, `split.json` and
    `checkpoints/checkpoint-NNNNNN/` (accelerate state + `unet/` safetensors).
    A folder holding a run of another generator, base or settings is refused (`TrainingRunMismatch`)
    unless `overwrite` deletes that run first; the same run resumes (`run_identity`).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg = config or TailoredTrainingConfig()
    output_dir = Path(output_dir)
    identity = training_identity(generator_spec, base, cfg)
    if not overwrite:  # every process refuses alike, before any work
        check_training_run(output_dir, identity, record=False)

    # 1. Accelerator: processes, mixed precision, gradient accumulation, tracker.
    report_to = None if cfg.report_to in (None, "", "none") else cfg.report_to
    # cpu=True on a machine without CUDA: several processes there form a gloo (MULTI_CPU) group.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.resolved_mixed_precision(),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        # the folder is this run's from now on (an --overwrite keeps the manifest being trained on)
        check_training_run(output_dir, identity, overwrite=overwrite, keep=[manifest])
        # what a killed earlier run left: half-saved checkpoints and temporary files of atomic writes
        _remove_partial_checkpoints(output_dir)
        remove_stale_temp_files(output_dir, recursive=False)
        cfg.save(output_dir / "training_config.json")
    accelerator.wait_for_everyone()  # an --overwrite has emptied the folder before anyone reads it

    # 2. Data: manifest rows, seeded validation split.
    rows = read_manifest(manifest)
    train_rows, val_rows = split_validation(rows, cfg)
    if accelerator.is_main_process:
        write_json_atomic(output_dir / "split.json", {"manifest": str(Path(manifest).resolve()),
                                                      "train": [r["id"] for r in train_rows],
                                                      "validation": [r["id"] for r in val_rows]})

    # 3. Models: only the UNet trains.
    parts = load_base_components(base)
    unet, vae, text_encoder, tokenizer, noise_scheduler = (
        parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["noise_scheduler"])
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema_unet = None
    if cfg.use_ema:
        ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                            model_config=unet.config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)

    # 4. Optimizer and lr schedule (steps counted per process, as diffusers' example does).
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.resolved_warmup_steps() * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)

    # 5. Token ids for every row; latents encoded once (or images read per batch).
    input_ids = tokenize(tokenizer, [r["prompt"] for r in train_rows])
    empty_ids = tokenize(tokenizer, [""])[0]
    if cfg.precompute_latents:
        latents = (_cached_latents(vae, train_rows, cfg, accelerator) if cfg.latent_cache_dir is not None
                   else _encode_rows(vae, train_rows, cfg, accelerator))
        train_dataset = LatentPromptDataset(latents, input_ids)
    else:
        train_dataset = ImagePromptDataset(TailoredImageDataset(train_rows, cfg.resolution), input_ids)
    val_batch = None
    if val_rows:
        val_batch = (_encode_rows(vae, val_rows[: cfg.selection_batch_size], cfg, accelerator),
                     tokenize(tokenizer, [r["prompt"] for r in val_rows[: cfg.selection_batch_size]]))
    sampler = EpochShuffleSampler(len(train_dataset), cfg.seed)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=cfg.train_batch_size, sampler=sampler,
                                                   num_workers=cfg.dataloader_num_workers, drop_last=False)

    # 6. Prepare for the processes; register how checkpoints save the UNet (safetensors, `unet/`).
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    if ema_unet is not None:
        ema_unet.to(accelerator.device)

    def save_model_hook(models, weights, folder):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(folder) / "unet_train" if ema_unet else
                                                                Path(folder) / "unet")
                weights.pop()
            if ema_unet is not None:  # the deployable weights (what selection evaluates) are the EMA ones
                ema_unet.save_pretrained(Path(folder) / "unet")

    def load_model_hook(models, folder):
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(Path(folder) / "unet", UNet2DConditionModel)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to(accelerator.device)
        for _ in range(len(models)):
            model = models.pop()
            loaded = UNet2DConditionModel.from_pretrained(folder, subfolder="unet_train" if ema_unet else "unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    updates_per_epoch = math.ceil(len(train_dataloader) / cfg.gradient_accumulation_steps)
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("cyclex_tailored", config={k: ("none" if v is None else v)
                                                             for k, v in cfg.to_dict().items()})

    # 7. Resume from the latest checkpoint (model, optimizer, lr scheduler, RNG, step, data position).
    global_step, first_epoch, skip_batches = 0, 0, 0
    resume_path = _resolve_resume(output_dir, cfg.resume_from_checkpoint)
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path)
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * cfg.gradient_accumulation_steps

    # 8. The loop.
    from tqdm.auto import tqdm

    total_batch = cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    logger.info("training %d images (%d validation), batch %d total, %d steps from step %d, lr warm-up %d steps",
                len(train_dataset), len(val_rows), total_batch, cfg.max_train_steps, global_step,
                cfg.resolved_warmup_steps())
    if cfg.resolved_warmup_steps() >= cfg.max_train_steps:
        logger.warning("lr warm-up (%d steps) is as long as the run (%d): the learning rate never reaches %g "
                       "(--warmup-steps)", cfg.resolved_warmup_steps(), cfg.max_train_steps, cfg.learning_rate)
    progress = tqdm(range(cfg.max_train_steps), initial=global_step, desc="tailored SD steps",
                    disable=not accelerator.is_local_main_process)
    saved: list[str] = []
    last_loss, images_seen, train_seconds = float("nan"), 0, 0.0
    epoch = first_epoch
    accumulated = 0.0
    while global_step < cfg.max_train_steps:
        loader = train_dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        # accelerate's loaders set the sampler's epoch from their own counter when iterated: set both.
        sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        start_index = skip_batches if epoch == first_epoch else 0
        tick = time.perf_counter()
        for batch_index, batch in enumerate(loader, start=start_index):
            with accelerator.accumulate(unet):
                generator = batch_generator(accelerator.device, cfg.seed, epoch, batch_index, accelerator.process_index)
                if "latents" in batch:
                    latents = batch["latents"].to(dtype=weight_dtype)
                else:
                    latents = encode_latents(vae, batch["pixel_values"]).to(dtype=weight_dtype)
                ids = drop_prompts(batch["input_ids"], empty_ids, cfg.p_uncond, generator)
                with torch.no_grad():
                    encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
                loss = diffusion_loss(unet, noise_scheduler, latents, encoder_hidden_states, generator)
                # the mean over processes, for logging only
                accumulated += accelerator.gather(loss.detach()[None]).mean().item() / cfg.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            images_seen += latents.shape[0] * accelerator.num_processes

            if accelerator.sync_gradients:
                if ema_unet is not None:
                    ema_unet.step(unet.parameters())
                global_step += 1
                progress.update(1)
                last_loss, accumulated = accumulated, 0.0
                logs = {"train_loss": last_loss, "lr": lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(loss=f"{last_loss:.4f}")
                train_seconds += time.perf_counter() - tick
                if val_batch is not None and global_step % cfg.validation_steps == 0:
                    logs["val_loss"] = _validation_loss(unet, text_encoder, noise_scheduler, val_batch, cfg,
                                                        accelerator, weight_dtype)
                accelerator.log(logs, step=global_step)
                if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                    saved.append(_save_checkpoint(accelerator, output_dir, global_step, cfg))
                tick = time.perf_counter()
                if global_step >= cfg.max_train_steps:
                    break
        epoch += 1
    progress.close()

    # 9. Final pipeline folder (UNet = final weights, EMA ones when EMA is on) and metadata.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        if ema_unet is not None:
            ema_unet.copy_to(final_unet.parameters())
        _save_pipeline_folder(output_dir, base, final_unet, manifest, cfg, generator_spec, global_step,
                              accelerator.num_processes)
    accelerator.end_training()
    rate = images_seen / train_seconds if train_seconds > 0 else float("nan")
    return TrainingResult(output_dir=output_dir, global_step=global_step, images_per_s=rate, last_loss=last_loss,
                          checkpoints=saved)


def _cached_latents(vae, rows: list[dict], cfg: TailoredTrainingConfig, accelerator) -> torch.Tensor:
    """The rows' latents from `cfg.latent_cache_dir`: checked by the main process, the missing shards
    encoded by every process (shard k by process k mod N), then read back by all (latent_cache.py)."""
    from cyclex.provenance import module_weights_sha256
    from cyclex.tailored_training.latent_cache import (
        META_NAME,
        encode_latent_shards,
        load_latent_cache,
        prepare_latent_cache,
    )

    folder = Path(cfg.latent_cache_dir)
    if accelerator.is_main_process:
        prepare_latent_cache(folder, rows, cfg.resolution, module_weights_sha256(vae), cfg.latent_cache_shard_size)
    accelerator.wait_for_everyone()
    meta = json.loads((folder / META_NAME).read_text())
    encoded = encode_latent_shards(vae, TailoredImageDataset(rows, cfg.resolution), folder, meta,
                                   device=accelerator.device, encode=encode_latents,
                                   process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    if encoded:
        logger.info("latent cache %s: process %d encoded shards %s", folder, accelerator.process_index, encoded)
    accelerator.wait_for_everyone()
    return load_latent_cache(folder, meta)


def _encode_rows(vae, rows: list[dict], cfg: TailoredTrainingConfig, accelerator) -> torch.Tensor:
    """Latents of the rows' images, (N, C, h, w) float32 on CPU, encoded in batches."""
    images = TailoredImageDataset(rows, cfg.resolution)
    chunks = []
    for start in range(0, len(images), 32):
        batch = torch.stack([images[i]["pixel_values"] for i in range(start, min(start + 32, len(images)))])
        chunks.append(encode_latents(vae, batch.to(accelerator.device)).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def _validation_loss(unet, text_encoder, noise_scheduler, val_batch, cfg, accelerator, weight_dtype) -> float:
    """The diffusion loss on a fixed validation batch with fixed noise (comparable across steps)."""
    latents, ids = val_batch
    generator = batch_generator(accelerator.device, cfg.seed, 7_777_777)
    hidden = text_encoder(ids.to(accelerator.device), return_dict=False)[0]
    unet.eval()
    loss = diffusion_loss(unet, noise_scheduler, latents.to(accelerator.device, weight_dtype), hidden, generator)
    unet.train()
    return float(loss)


def _save_checkpoint(accelerator, output_dir: Path, step: int, cfg: TailoredTrainingConfig) -> str:
    """Save the training state as checkpoints/checkpoint-NNNNNN, written under a temporary name first."""
    path = output_dir / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # an earlier attempt at this step, killed mid-save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state at least)
    if accelerator.is_main_process:
        if path.exists():  # the same step saved before (an explicit earlier resume), or a legacy partial one
            replaced = path.with_name(path.name + REPLACED_SUFFIX)
            shutil.rmtree(replaced, ignore_errors=True)
            path.rename(replaced)
            partial.rename(path)
            shutil.rmtree(replaced)
        else:
            partial.rename(path)
        _prune_checkpoints(output_dir, cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    logger.info("saved checkpoint %s", path)
    return str(path.relative_to(output_dir))


def _save_pipeline_folder(output_dir: Path, base, unet, manifest, cfg: TailoredTrainingConfig,
                          generator_spec: str | None, global_step: int, num_processes: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from cyclex.tailored_training.output import clean_scheduler_config, write_tailored_metadata

    parts = load_base_components(base)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet.to(torch.float32),
        # inversion and sampling are DDIM; keys of the base's scheduler class (PNDM's skip_prk_steps) are dropped
        scheduler=DDIMScheduler.from_config(clean_scheduler_config(DDIMScheduler, parts["noise_scheduler"].config)),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    write_tailored_metadata(output_dir, manifest=manifest, base=str(base), config=cfg,
                            generator_spec=generator_spec, global_step=global_step, num_processes=num_processes)
