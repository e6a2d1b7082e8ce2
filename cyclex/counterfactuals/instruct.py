"""Instruction editing (InstructPix2Pix / InstructX2X, seed 001, SPEC section 3): `--variant instruct`.

An InstructPix2Pix-style editor is a Stable Diffusion whose UNet takes 8 input channels: the noisy
latent z_t concatenated with the query's image latent E(I) (the VAE posterior mode, unscaled, as
diffusers' `StableDiffusionInstructPix2PixPipeline.prepare_image_latents`). It is loaded through that
pipeline class from a local folder or a hub id, so an InstructX2X-style checkpoint plugs in; cyclex's
own editor is trained on exact phantom pairs (`cyclex.tailored_training.instruct_training`).

Per request the finding the target prompt drops becomes an instruction ("Remove the pleural
effusion", `InstructionTemplates`), and DDIM (eta = 0) samples from seeded noise with the
three-way guidance of InstructPix2Pix (Brooks et al., eq. 3):

    eps = eps(z, 0, 0) + s_I (eps(z, I, 0) - eps(z, 0, 0)) + s_T (eps(z, I, T) - eps(z, I, 0))

with s_T = 7.5 (`guidance_scale`) and s_I = 1.5 (`image_guidance_scale`); one UNet pass of 3B rows per
step. The loop is ours, not the pipeline's `__call__`, so masks and region-specific editing work the
same as in the DDIM makers (a test checks it matches `__call__` step for step): outside a mask the
latent is reset after step i to the query latent noised with the request's own noise to
timesteps[i + 1] (the clean query latent after the last step), as diffusers' inpainting pipeline
does, and `paste_query_outside_mask` pastes the query's pixels back.

`InstructRegionEditMaker` (`--variant instruct-rse`) adds RSE masking: relevance
R = |eps(z_t, I, T) - eps(z_t, I, "")| summed over channels (seed 001's relevance on the instruction
model), averaged over seeded noise draws at t_rel, clipped (IQR) and normalised; G = M * R with the
finding's pseudo mask M; edit mask 1(G >= tau).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
from cyclex.counterfactuals.inversion import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    resize_images,
    strength_to_start_index,
)
from cyclex.counterfactuals.inversion_cache import image_hash
from cyclex.counterfactuals.rse import (
    checked_region_settings,
    guidance_and_edit_mask,
    pseudo_masks,
    robust_normalise,
)
from cyclex.findings import removed_findings

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_GUIDANCE = 1.5  # s_I of InstructPix2Pix (and diffusers' pipeline default)
INSTRUCT_METADATA = "cyclex_instruct.json"  # what cyclex's own editors record about their training


# -- instructions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstructionTemplates:
    """How findings become instructions; {finding} is the lower-case finding name.

    location: appended to the finding (e.g. " in the right lung") when the side is known, else left out.
    unchanged: the instruction when the target prompt keeps every finding (the maker's reconstruction).
    """

    remove: str = "Remove the {finding}"
    add: str = "Add {finding}"
    change: str = "Change the {finding} to {severity}"
    location: str = " in the {location} lung"
    unchanged: str = ""
    joiner: str = ". "  # between the sentences of a request that changes several findings

    def __post_init__(self) -> None:
        for name in ("remove", "add", "change"):
            if "{finding}" not in getattr(self, name):
                raise ValueError(f"InstructionTemplates.{name} must contain {{finding}}, got {getattr(self, name)!r}")
        if "{severity}" not in self.change:
            raise ValueError(f"InstructionTemplates.change must contain {{severity}}, got {self.change!r}")
        if self.location and "{location}" not in self.location:
            raise ValueError(f"InstructionTemplates.location must contain {{location}} (or be empty), got {self.location!r}")

    def sentence(self, kind: str, finding: str, *, location: str | None = None, severity: str | None = None) -> str:
        """One instruction: kind "remove" | "add" | "change" (the latter needs `severity`)."""
        if kind not in ("remove", "add", "change"):
            raise ValueError(f"instruction kind must be 'remove', 'add' or 'change', got {kind!r}")
        if kind == "change" and not severity:
            raise ValueError("a 'change' instruction needs severity= (e.g. 'mild')")
        name = finding.lower()
        if location and self.location:
            name += self.location.format(location=location)
        return getattr(self, kind).format(finding=name, severity=severity or "")

    def for_prompts(self, source_prompt: str, target_prompt: str, locations: dict[str, str] | None = None) -> str:
        """The instruction that turns the source prompt's image into the target prompt's: the removed
        findings' "remove" sentences, then the added findings' "add" sentences."""
        removed = removed_findings(source_prompt, target_prompt)
        added = removed_findings(target_prompt, source_prompt)
        locations = locations or {}
        sentences = [self.sentence("remove", f, location=locations.get(f)) for f in removed]
        sentences += [self.sentence("add", f, location=locations.get(f)) for f in added]
        return self.joiner.join(sentences) if sentences else self.unchanged


def mask_side(mask: np.ndarray | torch.Tensor, share: float = 0.8) -> str | None:
    """The patient side a finding mask (H, W) lies on in a PA film: the image's left half is the
    patient's right. None when neither half holds `share` of the mask (or the mask is empty)."""
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64).squeeze()
    total = m.sum()
    if m.ndim != 2 or total <= 0:
        return None
    left_half = m[:, : m.shape[1] // 2].sum() / total
    if left_half >= share:
        return "right"
    if 1 - left_half >= share:
        return "left"
    return None


# -- loading ---------------------------------------------------------------------------------------
def load_instruct_pipeline(source: str | Path, device=None, dtype=None):
    """A `StableDiffusionInstructPix2PixPipeline` from a saved folder (offline) or a hub id.

    A folder must be a `save_pretrained` folder whose UNet takes twice the VAE's latent channels.
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    path = Path(source)
    kwargs: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
                              "torch_dtype": dtype if dtype is not None else torch.float32}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"instruct model {path}: model_index.json is missing; expected a "
                                    "StableDiffusionInstructPix2PixPipeline.save_pretrained folder")
        kwargs["local_files_only"] = True
        source = path
    elif path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"instruct model {str(source)!r} is neither an existing folder nor a hub id (owner/name)")
    try:
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load an InstructPix2Pix pipeline from {source}: {err}") from err
    check_instruct_unet(pipe, str(source))
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_instruct_unet(pipe, name: str = "pipe") -> None:
    latent = int(pipe.vae.config.latent_channels)
    channels = int(pipe.unet.config.in_channels)
    if channels != 2 * latent:
        raise ValueError(f"instruct model {name}: its UNet takes {channels} input channels; an InstructPix2Pix UNet "
                         f"takes {2 * latent} (the noisy latent and the query's image latent, {latent} each)")


def _request_noise(images: torch.Tensor, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Start noise per request, a function of (seed, the image's bytes): the same query gets the same
    noise whatever else shares its batch, so a resumed or re-batched run draws the same counterfactual."""
    rows = []
    for image in images:
        key = int(image_hash(image)[:15], 16)
        state = np.random.SeedSequence([int(seed), key]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state % (2**63)))
        rows.append(torch.randn(shape, generator=generator))
    return torch.stack(rows)


# -- the maker -------------------------------------------------------------------------------------
class InstructEditMaker(CounterfactualMaker):
    """Counterfactuals from an instruction-editing model (`--variant instruct`).

    pipe: a `StableDiffusionInstructPix2PixPipeline` (8-channel UNet), e.g. `load_instruct_pipeline(DIR)`.
    num_inference_steps: DDIM steps T (50). guidance_scale: s_T (7.5). image_guidance_scale: s_I (1.5).
    strength: 1.0 starts from pure noise (InstructPix2Pix); delta < 1 starts from the query latent
        noised to timesteps[round((1 - delta) T)] (an extension, recorded).
    templates: `InstructionTemplates`. location_from_mask: with caller masks, name the side the mask
        lies on in the instruction (`mask_side`).
    paste_query_outside_mask: with masks, paste the query's pixels back outside the mask.
    """

    name = "instruct"

    def __init__(
        self,
        pipe,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        strength: float = 1.0,
        *,
        image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE,
        templates: InstructionTemplates | dict | None = None,
        location_from_mask: bool = False,
        paste_query_outside_mask: bool = True,
        model_name: str | None = None,
    ) -> None:
        from diffusers import DDIMScheduler

        missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, p, None) is None]
        if missing:
            raise ValueError(f"pipe lacks the parts {missing}; pass a StableDiffusionInstructPix2PixPipeline")
        check_instruct_unet(pipe)
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if float(guidance_scale) < 0 or float(image_guidance_scale) < 0:
            raise ValueError(f"guidance_scale (s_T) and image_guidance_scale (s_I) must be >= 0, got "
                             f"{guidance_scale} and {image_guidance_scale}")
        strength_to_start_index(strength, int(num_inference_steps))  # validates (0, 1]
        if isinstance(templates, dict):
            templates = InstructionTemplates(**templates)
        self.pipe = pipe
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.image_guidance_scale = float(image_guidance_scale)
        self.strength = float(strength)
        self.templates = templates or InstructionTemplates()
        self.location_from_mask = bool(location_from_mask)
        self.paste_query_outside_mask = bool(paste_query_outside_mask)
        self.model_name = str(model_name or getattr(pipe, "name_or_path", None) or f"in-memory:{id(pipe.unet)}")
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(self.num_inference_steps)
        self.unet_calls = 0  # UNet evaluations per batch row, over the maker's life

    # -- settings ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def image_size(self) -> int:
        vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return int(self.pipe.unet.config.sample_size) * vae_scale

    def settings(self) -> dict[str, Any]:
        return {"variant": self.name, "steps": self.num_inference_steps, "guidance": self.guidance_scale,
                "image_guidance": self.image_guidance_scale, "strength": self.strength,
                "instruct_model": self.model_name, "templates": asdict(self.templates),
                "location_from_mask": self.location_from_mask,
                "paste_query_outside_mask": self.paste_query_outside_mask}

    def instructions(self, source_prompts: Sequence[str], target_prompts: Sequence[str],
                     masks: torch.Tensor | None = None) -> list[str]:
        """One instruction per request (the removed finding's, its side from the mask when asked)."""
        out = []
        for i, (source, target) in enumerate(zip(source_prompts, target_prompts, strict=True)):
            locations = None
            if self.location_from_mask and masks is not None:
                side = mask_side(masks[i])
                locations = {f: side for f in removed_findings(source, target)} if side else None
            out.append(self.templates.for_prompts(source, target, locations))
        return out

    # -- the model's parts ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, L, D) text embeddings, as the pipeline's `_encode_prompt` makes them (no CFG copies)."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def encode_queries(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) in [0, 1] at the model's size -> (image latents E(I): posterior mode, unscaled, the
        UNet's conditioning; z_query: the same times the scaling factor, the sampling space)."""
        vae = self.pipe.vae
        x = images.to(self.device, vae.dtype).repeat(1, 3, 1, 1) * 2 - 1
        mode = vae.encode(x).latent_dist.mode()
        return mode.to(self.dtype), (mode * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        rgb = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return ((rgb.float().mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)

    def eps_three(self, z: torch.Tensor, t, text: torch.Tensor, empty: torch.Tensor, image_latents: torch.Tensor):
        """(eps(z, I, T), eps(z, I, 0), eps(z, 0, 0)) from one UNet pass of 3N rows, the pipeline's layout."""
        n = z.shape[0]
        model_in = self.scheduler.scale_model_input(torch.cat([z, z, z]), t)
        conditioning = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        hidden = torch.cat([text, empty, empty])
        eps = self.pipe.unet(torch.cat([model_in, conditioning], dim=1), t, encoder_hidden_states=hidden).sample
        self.unet_calls += 3 * n
        return eps.chunk(3)

    def guided_eps(self, z, t, text, empty, image_latents) -> torch.Tensor:
        eps_text_image, eps_image, eps_uncond = (e.float() for e in self.eps_three(z, t, text, empty, image_latents))
        return (eps_uncond + self.image_guidance_scale * (eps_image - eps_uncond)
                + self.guidance_scale * (eps_text_image - eps_image)).to(z.dtype)

    # -- hook: where the edit may act (the caller's masks; instruct-rse computes its own) -------
    def _edit_region(self, images, image_latents, z_query, text, empty, source_prompts, target_prompts, masks, seed):
        return masks, {}

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, z_query: torch.Tensor, image_latents: torch.Tensor, text: torch.Tensor,
               empty: torch.Tensor, latent_mask: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM from `noise` (B, C, h, w) with three-way guidance -> z_0. latent_mask (B, 1, h, w) in
        {0, 1}: outside it, after step i the sample is reset to z_query noised to timesteps[i + 1]
        with the same noise (z_query itself after the last step)."""
        T = self.num_inference_steps
        self.scheduler.set_timesteps(T)
        timesteps = self.scheduler.timesteps
        start = strength_to_start_index(self.strength, T)
        noise = noise.to(self.device, self.dtype)
        z = noise * self.scheduler.init_noise_sigma if start == 0 else \
            self.scheduler.add_noise(z_query, noise, timesteps[start].repeat(z_query.shape[0]))
        for i in range(start, T):
            t = timesteps[i]
            z = self.scheduler.step(self.guided_eps(z, t, text, empty, image_latents), t, z, eta=0.0).prev_sample
            if latent_mask is not None:
                reference = z_query if i + 1 == T else \
                    self.scheduler.add_noise(z_query, noise, timesteps[i + 1].repeat(z_query.shape[0]))
                z = reference + latent_mask * (z - reference)
        return z

    def make(self, images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str], *,
             masks: torch.Tensor | None = None, seed: int = 0) -> CounterfactualOutput:
        """images (B, 1, H, W) in [0, 1] -> counterfactuals (B, 1, H, W) in [0, 1]."""
        # 1. Check inputs
        self.check_request(images, source_prompts, target_prompts)
        query_size = tuple(images.shape[-2:])
        if masks is not None:
            self.check_masks(masks, images.shape[0], query_size)
        start_time, start_calls = time.perf_counter(), self.unet_calls
        # 2. Instructions and their embeddings; the query's latents at the model's size
        instructions = self.instructions(source_prompts, target_prompts, masks)
        text, empty = self.encode_text(instructions), self.encode_text([""] * len(instructions))
        size = self.image_size
        image_latents, z_query = self.encode_queries(resize_images(images.float().clamp(0, 1), (size, size)))
        noise = _request_noise(images, seed, tuple(z_query.shape[1:]))
        # 3. Where the edit may act
        region, extras = self._edit_region(images, image_latents, z_query, text, empty, source_prompts,
                                           target_prompts, masks, seed)
        latent_mask = None
        if region is not None:
            latent_mask = (F.interpolate(region.float(), size=z_query.shape[-2:], mode="area") > 0).to(self.device, self.dtype)
        # 4. Sample, decode, back at the query's size
        z0 = self.sample(noise, z_query, image_latents, text, empty, latent_mask)
        cf = resize_images(self.decode(z0), query_size).cpu().float()
        # 5. Keep the query's pixels outside the mask
        if region is not None and self.paste_query_outside_mask:
            m = region.float().cpu()
            if tuple(m.shape[-2:]) != query_size:
                m = F.interpolate(m, size=query_size, mode="nearest")
            m = m.clamp(0, 1)
            cf = m * cf + (1 - m) * images.to(cf)
        b = images.shape[0]
        calls, seconds = self.unet_calls - start_calls, time.perf_counter() - start_time
        details = [{**self.settings(), "seed": int(seed), "instruction": instruction, "unet_calls": calls / b,
                    "seconds": seconds / b, "unet_calls_batch": calls, "seconds_batch": round(seconds, 4),
                    "batch_size": b} for instruction in instructions]
        logger.debug("%s maker: %d requests, %d UNet evaluations, %.2fs", self.name, b, calls, seconds)
        return CounterfactualOutput(images=cf, details=details, extras=extras)


class InstructRegionEditMaker(InstructEditMaker):
    """Instruction editing confined to where the instruction's relevance and the finding's pseudo mask
    agree (`--variant instruct-rse`); the settings of `RegionSpecificEditMaker` (relevance_strength,
    relevance_draws, tau, prior) mean the same here."""

    name = "instruct-rse"

    def __init__(self, pipe, num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 strength: float = 1.0, *, relevance_strength: float = 0.5, relevance_draws: int = 4,
                 tau: float = 0.1, prior: str = "anatomy", **settings) -> None:
        super().__init__(pipe, num_inference_steps, guidance_scale, strength, **settings)
        self.relevance_strength, self.relevance_draws, self.tau, self.prior = checked_region_settings(
            relevance_strength, relevance_draws, tau, prior, self.num_inference_steps)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "relevance_strength": self.relevance_strength,
                "relevance_draws": self.relevance_draws, "tau": self.tau, "prior": self.prior}

    @torch.no_grad()
    def relevance_maps(self, z_query: torch.Tensor, image_latents: torch.Tensor, text: torch.Tensor,
                       empty: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """R (B, h, w) in [0, 1]: |eps(z_t, I, T) - eps(z_t, I, "")| summed over channels, mean over draws."""
        b, d = z_query.shape[0], self.relevance_draws
        self.scheduler.set_timesteps(self.num_inference_steps)
        t = self.scheduler.timesteps[strength_to_start_index(self.relevance_strength, self.num_inference_steps)]
        generator = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((d * b, *z_query.shape[1:]), generator=generator).to(self.device, self.dtype)
        z_t = self.scheduler.add_noise(z_query.repeat(d, 1, 1, 1), noise, t.repeat(d * b))
        image = image_latents.repeat(d, 1, 1, 1)
        model_in = torch.cat([self.scheduler.scale_model_input(torch.cat([z_t, z_t]), t), torch.cat([image, image])], 1)
        eps = self.pipe.unet(model_in, t, encoder_hidden_states=torch.cat([text.repeat(d, 1, 1), empty.repeat(d, 1, 1)])).sample
        self.unet_calls += 2 * d * b
        eps_text, eps_empty = eps.float().chunk(2)
        difference = (eps_text - eps_empty).abs().sum(dim=1)  # (d * B, h, w)
        return robust_normalise(difference.view(d, b, *difference.shape[1:]).mean(dim=0))

    def _edit_region(self, images, image_latents, z_query, text, empty, source_prompts, target_prompts, masks, seed):
        relevance = self.relevance_maps(z_query, image_latents, text, empty, seed).unsqueeze(1)
        if masks is None:
            masks = pseudo_masks(images, source_prompts, target_prompts, self.prior)
        return guidance_and_edit_mask(relevance, masks, self.tau, tuple(images.shape[-2:]))


def instruct_pipeline_for(pipe, instruct_model) -> tuple[Any, str]:
    """The instruction model a factory gets: `instruct_model` (folder, hub id or loaded pipeline), or
    `pipe` itself when that is an InstructPix2Pix pipeline; loaded on `pipe`'s device and dtype."""
    if instruct_model is None:
        unet = getattr(pipe, "unet", None)
        if unet is not None and getattr(pipe, "vae", None) is not None and \
                int(unet.config.in_channels) == 2 * int(pipe.vae.config.latent_channels):
            return pipe, str(getattr(pipe, "name_or_path", "") or f"in-memory:{id(unet)}")
        raise ValueError("the instruct variants need instruct_model=: an InstructPix2Pix pipeline folder or hub id "
                         "(cyclex explain --instruct-model DIR), or a loaded StableDiffusionInstructPix2PixPipeline")
    if isinstance(instruct_model, (str, Path)):
        unet = getattr(pipe, "unet", None)
        device = unet.device if unet is not None else None
        dtype = unet.dtype if unet is not None else None
        return load_instruct_pipeline(instruct_model, device=device, dtype=dtype), str(instruct_model)
    check_instruct_unet(instruct_model, "instruct_model")
    return instruct_model, str(getattr(instruct_model, "name_or_path", "") or f"in-memory:{id(instruct_model.unet)}")

