"""Train an InstructPix2Pix-style editor from a tailored SD on exact phantom pairs (seed 001, SPEC section 3).

Read top to bottom like diffusers' `examples/instruct_pix2pix/train_instruct_pix2pix.py`, whose recipe
this follows: the tailored SD's UNet becomes an 8-channel one (`instruct_unet_from`: the noisy latent's
4 input channels keep their weights, the 4 new ones for the query's image latent start at zero, so
the untrained editor predicts exactly what the tailored UNet does), VAE and text encoder frozen,
the loss `|| eps - eps_theta([z_t, E(I)], t, tau(instruction)) ||^2` on the edited image's latent z,
and conditioning dropout (InstructPix2Pix sec. 3.2.1, p = 0.05 each): of every batch row, with
probability p the instruction is dropped, with p both, with p the image latent, so the three-way
guidance at inference has all three predictions to work with.

Only the phantom world gives exact training pairs: the same patient drawn with and without the
finding (`cyclex.datasets.phantom.without_finding`), so the editor learns removal from the true
counterfactual rather than from a generated one (`phantom_instruction_pairs`).

Checkpoints and resume reuse the tailored training's machinery (`train.py`): accelerate's
`save_state` into `checkpoint-NNNNNN.partial/`, renamed once complete; the next run removes partial
folders and resumes from the latest complete checkpoint (model, optimizer, lr schedule, RNG); the
data order of every epoch and the noise of every batch are fixed functions of the seed, so a
resumed run ends where an uninterrupted one does. `instruct_run.json` records what the run is; a
folder holding another run is refused unless `overwrite` empties it.

The result is a `StableDiffusionInstructPix2PixPipeline` folder (`save_pretrained`) plus
`cyclex_instruct.json`; `cyclex.counterfactuals.instruct.load_instruct_pipeline` reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cyclex.atomic_io import remove_stale_temp_files, write_json_atomic
from cyclex.counterfactuals.instruct import INSTRUCT_METADATA, InstructionTemplates
from cyclex.tailored_training.train import (
    EpochShuffleSampler,
    TrainingResult,
    _remove_partial_checkpoints,
    _resolve_resume,
    _save_checkpoint,
    batch_generator,
    checkpoint_step,
    encode_latents,
    load_base_components,
    tokenize,
    xray_to_vae_input,
)

logger = logging.getLogger(__name__)

RUN_FILE = "instruct_run.json"


@dataclass
class InstructTrainingConfig:
    """Hyper-parameters of instruction-editor training (defaults: diffusers' InstructPix2Pix example)."""

    train_batch_size: int = 4
    learning_rate: float = 5e-5
    max_train_steps: int = 15_000
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    conditioning_dropout_prob: float = 0.05  # InstructPix2Pix: 5 % text, 5 % image, 5 % both
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate's names)
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3  # oldest deleted after a successful save
    resume_from_checkpoint: str | None = "latest"  # "latest", a checkpoint name/path, or None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= float(self.conditioning_dropout_prob) <= 1 / 3:
            raise ValueError("InstructTrainingConfig.conditioning_dropout_prob must be in [0, 1/3] (three dropout "
                             f"cases share the rows), got {self.conditioning_dropout_prob}")
        for name in ("train_batch_size", "max_train_steps", "checkpointing_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"InstructTrainingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if float(self.learning_rate) <= 0:
            raise ValueError(f"InstructTrainingConfig.learning_rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstructTrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown InstructTrainingConfig fields {unknown}")
        return cls(**data)


# -- the 8-channel UNet --------------------------------------------------------------------------------
def instruct_unet_from(unet):
    """A copy of `unet` taking twice its input channels: [z_t, E(I)]. The first half of `conv_in` keeps
    the weights (and bias), the new half starts at zero (train_instruct_pix2pix.py's initialisation),
    so before training the result ignores E(I) and equals `unet` exactly."""
    import copy

    old = unet.conv_in
    new_unet = copy.deepcopy(unet)
    channels = int(unet.config.in_channels)
    new_unet.register_to_config(in_channels=2 * channels)
    with torch.no_grad():
        conv = torch.nn.Conv2d(2 * channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                               dtype=old.weight.dtype, device=old.weight.device)
        conv.weight.zero_()
        conv.weight[:, :channels].copy_(old.weight)
        conv.bias.copy_(old.bias)
    new_unet.conv_in = conv
    return new_unet


# -- exact phantom pairs ---------------------------------------------------------------------------
def phantom_instruction_pairs(n: int, set_seed: int, phantom_config=None, templates: InstructionTemplates | None = None,
                              *, include_add: bool = False, location_rate: float = 0.0, seed: int = 0) -> list[dict]:
    """Training pairs from `n` phantoms of set `set_seed` (`make_phantoms`): for each present finding
    (original = the phantom, edited = the same patient without that finding, "Remove the {finding}");
    with include_add also the reverse ("Add {finding}"). location_rate: share of instructions that name
    the finding's side (phantom metadata), seeded by `seed`. Each pair: {"id", "original", "edited"
    ((H, W) float32 in [0, 1]), "instruction"}."""
    from cyclex.datasets.phantom import PhantomConfig, make_phantoms, without_finding

    config = phantom_config or PhantomConfig()
    templates = templates or InstructionTemplates()
    rng = np.random.default_rng(seed)
    pairs = []
    for phantom in make_phantoms(n, set_seed, config):
        for finding, meta in sorted(phantom.findings_meta.items()):
            side = meta.get("side") if meta.get("side") in ("left", "right") else None
            location = side if side and rng.random() < location_rate else None
            edited = without_finding(phantom, finding, config).image.astype(np.float32)
            original = phantom.image.astype(np.float32)
            pairs.append({"id": f"{phantom.id}/{finding}/remove", "original": original, "edited": edited,
                          "instruction": templates.sentence("remove", finding, location=location)})
            if include_add:
                pairs.append({"id": f"{phantom.id}/{finding}/add", "original": edited, "edited": original,
                              "instruction": templates.sentence("add", finding, location=location)})
    if not pairs:
        raise ValueError(f"phantom_instruction_pairs: the {n} phantoms of set {set_seed} have no findings to pair")
    return pairs


def pairs_sha256(pairs: Sequence[dict]) -> str:
    """Identity of a training set: the images' bytes and instructions, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair["instruction"].encode())
        for key in ("original", "edited"):
            digest.update(np.ascontiguousarray(pair[key], dtype=np.float32).tobytes())
    return digest.hexdigest()


def conditioning_dropout(batch_size: int, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image) boolean (B,) rows: u ~ U[0, 1) per row; text dropped for u < 2p, image
    for p <= u < 3p, so p of the rows lose the text only, p both, p the image only (InstructPix2Pix)."""
    u = torch.rand(batch_size, generator=generator, device=generator.device)
    return u < 2 * p, (u >= p) & (u < 3 * p)


class _PairLatents(torch.utils.data.Dataset):
    def __init__(self, edited: torch.Tensor, original: torch.Tensor, input_ids: torch.Tensor):
        self.edited, self.original, self.input_ids = edited, original, input_ids

    def __len__(self) -> int:
        return len(self.edited)

    def __getitem__(self, index: int) -> dict:
        return {"edited": self.edited[index], "original": self.original[index], "input_ids": self.input_ids[index]}


@torch.no_grad()
def _encode_pairs(vae, pairs: Sequence[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(edited latents: posterior mean x scaling factor, the diffusion target's space; image latents of the
    originals: posterior mode, unscaled, the UNet's conditioning as the pipeline computes it)."""
    edited, original = [], []
    for start in range(0, len(pairs), 64):
        chunk = pairs[start:start + 64]
        edited_images = torch.from_numpy(np.stack([p["edited"] for p in chunk]))[:, None].to(device)
        original_images = torch.from_numpy(np.stack([p["original"] for p in chunk]))[:, None].to(device)
        edited.append(encode_latents(vae, edited_images).float().cpu())
        pixels = xray_to_vae_input(original_images).to(device=vae.device, dtype=vae.dtype)
        original.append(vae.encode(pixels).latent_dist.mode().float().cpu())
    return torch.cat(edited), torch.cat(original)


def _check_run(output_dir: Path, identity: dict, overwrite: bool) -> None:
    """Refuse a folder holding another run (naming what differs) unless `overwrite` empties it; record ours."""
    record = output_dir / RUN_FILE
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous != identity or overwrite:  # overwrite starts even the same run over
            if not overwrite:
                differing = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
                raise ValueError(f"{output_dir} holds another instruct training run (differs in {differing}); "
                                 "pass overwrite=True to delete it, or use another output folder")
            shutil.rmtree(output_dir)
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty and holds no {RUN_FILE}: not a folder cyclex made; "
                         "use an empty or new output folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, identity)


def train_instruct(pairs: Sequence[dict], base: str | Path, output_dir: str | Path,
                   config: InstructTrainingConfig | None = None, *, base_unet: str | Path | None = None,
                   templates: InstructionTemplates | None = None, data_description: str = "",
                   overwrite: bool = False) -> TrainingResult:
    """Train an 8-channel editor from the SD folder `base` (its `unet/`, or `base_unet`'s folder holding
    one, e.g. a tailored SD's checkpoint) on `pairs` (`phantom_instruction_pairs`); write the
    InstructPix2Pix pipeline folder to `output_dir`. Rerunning the same call resumes."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler

    from cyclex.tailored_training.output import clean_scheduler_config

    cfg = config or InstructTrainingConfig()
    output_dir = Path(output_dir)
    if not pairs:
        raise ValueError("train_instruct needs at least one (original, edited, instruction) pair")
    identity = {"base": str(Path(base).resolve()) if Path(base).exists() else str(base),
                "base_unet": None if base_unet is None else str(base_unet),
                "config": {k: v for k, v in cfg.to_dict().items() if k != "resume_from_checkpoint"},
                "data_sha256": pairs_sha256(pairs), "n_pairs": len(pairs)}

    # 1. Accelerator and the run folder (another run's folder is refused before any work)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              project_config=ProjectConfiguration(project_dir=str(output_dir)))
    if accelerator.is_main_process:
        _check_run(output_dir, identity, overwrite)
        _remove_partial_checkpoints(output_dir)
        remove_stale_temp_files(output_dir, recursive=False)
        write_json_atomic(output_dir / "training_config.json", cfg.to_dict())
    accelerator.wait_for_everyone()

    # 2. Models: the tailored SD's parts; its UNet widened to 8 input channels; only the UNet trains
    parts = load_base_components(base)
    source_unet = parts["unet"] if base_unet is None else UNet2DConditionModel.from_pretrained(base_unet, subfolder="unet")
    unet = instruct_unet_from(source_unet)
    vae, text_encoder, tokenizer, noise_scheduler = parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["noise_scheduler"]
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    unet.train()

    # 3. Optimizer and lr schedule
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)

    # 4. Data: latents encoded once (no augmentation), token ids of the instructions
    edited, original = _encode_pairs(vae, pairs, accelerator.device)
    dataset = _PairLatents(edited, original, tokenize(tokenizer, [p["instruction"] for p in pairs]))
    sampler = EpochShuffleSampler(len(dataset), cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler, drop_last=False)
    with torch.no_grad():
        null_text = text_encoder(tokenize(tokenizer, [""]).to(accelerator.device))[0]

    # 5. Prepare; checkpoints save the UNet as `unet/` (what the resume check looks for)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    def save_model_hook(models, weights, folder):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(folder) / "unet")
                weights.pop()

    def load_model_hook(models, folder):
        for _ in range(len(models)):
            model = models.pop()
            loaded = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # 6. Resume (model, optimizer, lr schedule, RNG, step, data position)
    updates_per_epoch = len(loader)  # one optimizer update per batch (no gradient accumulation)
    global_step, first_epoch, skip_batches = 0, 0, 0
    resume_path = _resolve_resume(output_dir, cfg.resume_from_checkpoint)
    if resume_path is not None:
        logger.info("resuming from %s", resume_path)
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path)
        first_epoch, skip_batches = divmod(global_step, updates_per_epoch)

    # 7. The loop
    saved: list[str] = []
    last_loss, images_seen, seconds = float("nan"), 0, 0.0
    epoch = first_epoch
    p = float(cfg.conditioning_dropout_prob)
    while global_step < cfg.max_train_steps:
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if epoch == first_epoch and skip_batches else loader
        sampler.set_epoch(epoch)
        if hasattr(epoch_loader, "set_epoch"):
            epoch_loader.set_epoch(epoch)
        start_index = skip_batches if epoch == first_epoch else 0
        tick = time.perf_counter()
        for batch_index, batch in enumerate(epoch_loader, start=start_index):
            generator = batch_generator(accelerator.device, cfg.seed, epoch, batch_index, accelerator.process_index)
            latents, image_latents = batch["edited"], batch["original"]
            bsz = latents.shape[0]
            noise = torch.randn(latents.shape, generator=generator, device=latents.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator,
                                      device=latents.device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with torch.no_grad():
                text = text_encoder(batch["input_ids"])[0]
            drop_text, drop_image = conditioning_dropout(bsz, p, generator)
            text = torch.where(drop_text.to(text.device)[:, None, None], null_text.expand_as(text), text)
            image_latents = image_latents * (~drop_image).to(image_latents)[:, None, None, None]
            target = noise_scheduler.get_velocity(latents, noise, timesteps) \
                if noise_scheduler.config.prediction_type == "v_prediction" else noise
            prediction = unet(torch.cat([noisy, image_latents], dim=1), timesteps, text, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), target.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            images_seen += bsz * accelerator.num_processes
            last_loss = float(accelerator.gather(loss.detach()[None]).mean())
            seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            if global_step % 100 == 0:
                logger.info("instruct step %d loss %.4f", global_step, last_loss)
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                saved.append(_save_checkpoint(accelerator, output_dir, global_step, cfg))
            if global_step >= cfg.max_train_steps:
                break
        epoch += 1

    # 8. The pipeline folder and what it is
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=vae.to("cpu"), text_encoder=text_encoder.to("cpu"), tokenizer=tokenizer,
            unet=accelerator.unwrap_model(unet).to("cpu", torch.float32),
            scheduler=DDIMScheduler.from_config(clean_scheduler_config(DDIMScheduler, noise_scheduler.config)),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(output_dir, safe_serialization=True)
        write_json_atomic(output_dir / INSTRUCT_METADATA, {
            "base": identity["base"], "base_unet": identity["base_unet"], "global_step": global_step,
            "n_pairs": len(pairs), "data_sha256": identity["data_sha256"], "data": data_description,
            "templates": asdict(templates or InstructionTemplates()), "last_loss": last_loss,
            "sample_size": int(pipe.unet.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)})
    accelerator.end_training()
    rate = images_seen / seconds if seconds > 0 else float("nan")
    return TrainingResult(output_dir=output_dir, global_step=global_step, images_per_s=rate, last_loss=last_loss,
                          checkpoints=saved)
