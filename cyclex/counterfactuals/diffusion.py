"""Latent-diffusion primitives shared by every diffusion counterfactual variant (contract C5).

`LatentDiffusion` holds the parts of a `StableDiffusionPipeline` (VAE, UNet, text encoder,
tokenizer, scheduler config) and exposes the four operations CVLM (seed 003), NTI (seed 000) and
RSE build on: encode / decode X-rays, encode prompts, DDIM-invert a latent and DDIM-sample from a
noisy latent with classifier-free guidance. All scheduler math comes from diffusers
(`DDIMScheduler`, `DDIMInverseScheduler`); this module is the loop around the UNet.

Conventions
- images: (B, 1, H, W) float32 in [0, 1]; they enter the 3-channel VAE as the gray channel
  replicated and scaled to [-1, 1]; decoded images are the mean over the 3 channels, back in [0, 1].
- latents: (B, C, h, w) already multiplied by `vae.config.scaling_factor` (SD's convention).
- the sampling schedule `timesteps` is the DDIM one (descending, T items, e.g. 981, 961, ..., 1).
  The inversion trajectory `ddim_invert(...)` returns z_0 .. z_T (T + 1 latents); `trajectory[k]`
  sits at the noise level of sampling step index T - k, so sampling from `trajectory[k]` starts at
  `start_index = T - k` (denoising strength delta = k / T, seed 000's delta).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from cyclex.image_checks import check_image_batch

logger = logging.getLogger(__name__)


class LatentDiffusion:
    """DDIM inversion and classifier-free-guided DDIM sampling on a Stable Diffusion pipeline.

    pipe: a diffusers `StableDiffusionPipeline` (any scheduler; a DDIM one is built from its config).
    num_inference_steps: T, the DDIM steps of inversion and sampling (seed 003: T = 50).

    `unet_calls` counts UNet evaluations per batch item (a classifier-free-guided step on B latents
    counts 2B); `unet_forward_passes` counts forward calls (batched CFG is one pass of 2B).
    """

    def __init__(self, pipe, num_inference_steps: int = 50) -> None:
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, p, None) is None]
        if missing:
            raise ValueError(f"pipe lacks the Stable Diffusion parts {missing}; pass a StableDiffusionPipeline")
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.num_inference_steps = int(num_inference_steps)
        # Eta = 0 DDIM both ways, on the pipeline's own noise schedule (betas, offset, spacing).
        config = dict(pipe.scheduler.config)
        if config.get("timestep_spacing", "leading") not in ("leading", "trailing"):
            # DDIMInverseScheduler knows only these two; both directions must share one schedule
            logger.warning("timestep_spacing %r not invertible by DDIMInverseScheduler; using 'leading'",
                           config["timestep_spacing"])
            config["timestep_spacing"] = "leading"
        self.scheduler = DDIMScheduler.from_config(config)
        self.inverse_scheduler = DDIMInverseScheduler.from_config(config)
        self.scheduler.set_timesteps(self.num_inference_steps)
        self.inverse_scheduler.set_timesteps(self.num_inference_steps)
        self.unet_calls = 0
        self.unet_forward_passes = 0
        self._empty_embeds: torch.Tensor | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def timesteps(self) -> torch.Tensor:
        """The T sampling timesteps, descending (DDIM `set_timesteps`)."""
        return self.scheduler.timesteps

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the VAE / UNet were trained on."""
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * vae_scale

    def describe(self) -> dict:
        """JSON-serialisable identity of the model + schedule (used in cache keys and results)."""
        path = getattr(self.pipe, "name_or_path", None) or getattr(self.pipe.config, "_name_or_path", None)
        return {"model": str(path) if path else f"in-memory:{id(self.unet)}", "steps": self.num_inference_steps}

    # -- encoders ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> latents (B, C, H/f, W/f): VAE posterior mean x scaling factor."""
        images = check_image_batch(images)  # (B, 1, H, W), no NaN, clamped to [0, 1]
        x = images.to(self.device, self.vae.dtype).repeat(1, 3, 1, 1) * 2 - 1
        latents = self.vae.encode(x).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 1, H, W) float32 in [0, 1] (mean over RGB)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor + shift
        rgb = self.vae.decode(z).sample
        return ((rgb.float().mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts (B strings) -> text embeddings (B, L, D) via `pipe.encode_prompt` (no CFG copy)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        embeds, _ = self.pipe.encode_prompt(
            list(prompts), self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds.to(self.dtype)

    def empty_prompt_embeds(self, batch_size: int) -> torch.Tensor:
        """The unconditional embedding (empty prompt) repeated to (B, L, D); computed once."""
        if self._empty_embeds is None:
            self._empty_embeds = self.encode_prompts([""])
        return self._empty_embeds.expand(batch_size, -1, -1)

    # -- the UNet ----------------------------------------------------------------------------
    def eps_single(self, latents: torch.Tensor, t, embeds: torch.Tensor) -> torch.Tensor:
        """Noise prediction under one set of text embeddings (one UNet pass of N rows)."""
        model_in = self.scheduler.scale_model_input(latents, t).to(self.dtype)  # fp32 latents into a half UNet
        eps = self.unet(model_in, t, encoder_hidden_states=embeds.to(self.dtype)).sample
        self.unet_calls += latents.shape[0]
        self.unet_forward_passes += 1
        return eps

    def eps_pair(self, latents: torch.Tensor, t, uncond: torch.Tensor, cond: torch.Tensor):
        """(eps_uncond, eps_cond) from one UNet pass of 2N rows (classifier-free guidance's two halves)."""
        n = latents.shape[0]
        model_in = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        both = self.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond]).to(self.dtype)).sample
        self.unet_calls += 2 * n
        self.unet_forward_passes += 1
        return both.chunk(2)

    def _eps(
        self, latents: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor,
        uncond: torch.Tensor | None, guidance: float,
    ) -> torch.Tensor:
        """Noise prediction, classifier-free guided when guidance != 1 (one UNet pass of 2B)."""
        if uncond is None or guidance == 1.0:
            return self.eps_single(latents, t, cond)
        eps_uncond, eps_cond = self.eps_pair(latents, t, uncond, cond)
        # Classifier-free guidance (Ho & Salimans): eps_u + w (eps_c - eps_u).
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    @staticmethod
    def _batch_embeds(embeds: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
        if embeds.ndim != 3:
            raise ValueError(f"{name} must be (B, L, D) text embeddings, got shape {tuple(embeds.shape)}")
        if embeds.shape[0] == batch_size:
            return embeds
        if embeds.shape[0] == 1:
            return embeds.expand(batch_size, -1, -1)
        raise ValueError(f"{name} has {embeds.shape[0]} rows for {batch_size} latents")

    # -- DDIM inversion and sampling --------------------------------------------------------
    @torch.no_grad()
    def ddim_invert(
        self, latents: torch.Tensor, cond_embeds: torch.Tensor, guidance: float = 1.0,
        uncond_embeds: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """DDIM (eta = 0) inversion z_0 -> z_T with `DDIMInverseScheduler`.

        latents (B, C, h, w) = z_0; cond_embeds (B or 1, L, D) of the source prompt. Guidance 1
        (seed 000 / NTI: invert at w = 1) uses the conditional prediction only. Returns the
        trajectory [z_0, z_1, ..., z_T] (T + 1 tensors, each (B, C, h, w)).
        """
        b = latents.shape[0]
        cond = self._batch_embeds(cond_embeds.to(self.device, self.dtype), b, "cond_embeds")
        uncond = None
        if guidance != 1.0:
            uncond = uncond_embeds if uncond_embeds is not None else self.empty_prompt_embeds(b)
            uncond = self._batch_embeds(uncond.to(self.device, self.dtype), b, "uncond_embeds")
        self.inverse_scheduler.set_timesteps(self.num_inference_steps)
        z = latents.to(self.device, self.dtype)
        trajectory = [z]
        for t in self.inverse_scheduler.timesteps:
            eps = self._eps(self.inverse_scheduler.scale_model_input(z, t), t, cond, uncond, guidance)
            z = self.inverse_scheduler.step(eps, t, z).prev_sample
            trajectory.append(z)
        return trajectory

    @torch.no_grad()
    def ddim_sample(
        self,
        latents_t: torch.Tensor,
        cond_embeds: torch.Tensor,
        uncond_embeds: torch.Tensor | None = None,
        guidance: float = 7.5,
        start_index: int = 0,
        uncond_per_step: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """DDIM (eta = 0) sampling from `latents_t` at `timesteps[start_index]` down to z_0.

        cond_embeds / uncond_embeds: (B or 1, L, D); uncond defaults to the empty prompt.
        start_index > 0 skips the first steps of the same schedule (denoising strength
        delta = 1 - start_index / T). uncond_per_step: T tensors (B or 1, L, D) indexed by the
        absolute step index, replacing uncond_embeds at each step (null-text inversion).
        Returns z_0 (B, C, h, w). One scalar guidance over `guided_ddim_loop`.
        """
        T = self.num_inference_steps
        if not 0 <= int(start_index) < T:
            raise ValueError(f"start_index must be in [0, {T - 1}], got {start_index}")
        if uncond_per_step is not None and len(uncond_per_step) != T:
            raise ValueError(f"uncond_per_step needs one embedding per step ({T}), got {len(uncond_per_step)}")
        b = latents_t.shape[0]
        cond = self._batch_embeds(cond_embeds.to(self.device, self.dtype), b, "cond_embeds")
        if uncond_per_step is not None:
            uncond_steps = torch.stack([
                self._batch_embeds(u.to(self.device, self.dtype), b, f"uncond_per_step[{i}]")
                for i, u in enumerate(uncond_per_step)
            ])
        else:
            base = uncond_embeds if uncond_embeds is not None else self.empty_prompt_embeds(b)
            base = self._batch_embeds(base.to(self.device, self.dtype), b, "uncond_embeds")
            uncond_steps = base.unsqueeze(0).expand(T, -1, -1, -1)
        weights = torch.full((b,), float(guidance), device=self.device)
        return guided_ddim_loop(self, latents_t, cond, uncond_steps, weights, start_index=int(start_index))


def guided_ddim_loop(
    ld: LatentDiffusion,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond_steps: torch.Tensor,
    guidance: torch.Tensor,
    start_index: int = 0,
    step_offset: Callable[[int], torch.Tensor] | None = None,
    keep_outside: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    controller=None,
) -> torch.Tensor:
    """The one DDIM (eta = 0) sampling loop of cyclex: a guidance scale per row, an unconditional
    embedding per step, optional per-step hooks.

    latents (N, C, h, w) at timesteps[start_index]; cond (N, L, D); uncond_steps (T, N, L, D);
    guidance (N,). Per step i: eps = eps_u + w (eps_c - eps_u) (one UNet pass of 2N rows; the
    conditional pass alone when every w is 1 and no controller is given), DDIM step, then
    `+ step_offset(i)` (direct inversion), `controller.local_blend` (prompt-to-prompt; `controller`
    also gets `begin_step(i)`), `keep_outside(i, z)` (masked editing: z now sits at timesteps[i + 1]).
    Returns z_0 (N, C, h, w).
    """
    T = ld.num_inference_steps
    ld.scheduler.set_timesteps(T)
    w = guidance.to(ld.device, torch.float32).view(-1, 1, 1, 1)
    # w = 1 everywhere: eps_u + w (eps_c - eps_u) = eps_c, so skip the unconditional half (prompt-to-prompt
    # keeps its guided batch layout)
    unguided = controller is None and bool((w == 1.0).all())
    z = latents.to(ld.device, ld.dtype)
    cond = cond.to(ld.device, ld.dtype)
    for i in range(int(start_index), T):
        t = ld.scheduler.timesteps[i]
        if controller is not None:
            controller.begin_step(i)
        if unguided:
            eps = ld.eps_single(z, t, cond)
        else:
            eps_u, eps_c = ld.eps_pair(z, t, uncond_steps[i].to(ld.device, ld.dtype), cond)
            eps = (eps_u.float() + w * (eps_c.float() - eps_u.float())).to(ld.dtype)
        z = ld.scheduler.step(eps, t, z, eta=0.0).prev_sample
        if step_offset is not None:
            z = z + step_offset(i).to(z.dtype)
        if controller is not None:
            z = controller.local_blend(z)
        if keep_outside is not None:
            z = keep_outside(i, z)
    return z
