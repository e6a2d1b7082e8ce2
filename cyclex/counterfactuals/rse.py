"""Region-specific editing (InstructX2X, seed 001, SPEC section 3) on the tailored SD.

Plain DDIM (the `InvertThenEditMaker` base) with one hook overridden, `_edit_region`:
1. **Relevance map** R: the query latent z_0 noised to a fixed t_rel (`relevance_strength` of the
   schedule, DiffEdit's mask_encode_strength) under `relevance_draws` seeded noise draws; the UNet's
   noise prediction under the source prompt and under the edited prompt (finding removed);
   R = mean over draws of |eps_src - eps_tgt| summed over latent channels, clipped robustly at
   Q3 + 1.5 IQR, normalised to [0, 1] per item. (The paper uses one unseeded draw; several seeded
   draws make the map reproducible and less noisy.) diffusers' DiffEdit computes this kind of map but
   is deprecated in diffusers 0.42, so these few lines run on our own primitives.
2. **Pseudo mask** M per finding: the caller's `masks` (expert boxes, user masks), else the finding's
   anatomical prior on the query's chest box (`cyclex.explain.anatomical_priors`, the box estimated
   by Otsu), else (no prior) the full image.
3. **Guidance map** G = M * R and **edit mask** 1(G >= tau), tau = 0.1, on the latent grid.
4. **Masked denoising** (the base's `keep_outside`): outside the edit mask the latent is reset to the
   query's inverted latent at timesteps[i + 1] after step i (z*_0 after the last), as diffusers'
   inpainting pipeline does; DiffEdit, RadEdit and InstructX2X blend one step too noisy.
   `paste_query_outside_mask` (off by default here, a recorded setting) also pastes the query's
   pixels back outside the mask, as InstructX2X's code does.

The guidance map and the edit mask come back as `extras` ("guidance_map", "edit_mask", (B, 1, H, W)
at the query's size): the run folder saves them per item beside the frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cyclex.counterfactuals.inversion import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    Inversion,
    InvertThenEditMaker,
    strength_to_start_index,
)
from cyclex.explain.anatomical_priors import anatomical_prior
from cyclex.explain.frames import estimate_chest_box
from cyclex.findings import removed_findings

PRIORS = ("anatomy", "none")


def checked_region_settings(relevance_strength: float, relevance_draws: int, tau: float, prior: str,
                            num_inference_steps: int) -> tuple[float, int, float, str]:
    """The region-editing settings RSE and instruct-RSE share, validated: (strength, draws, tau, prior)."""
    strength_to_start_index(relevance_strength, num_inference_steps)  # validates (0, 1]
    if int(relevance_draws) < 1:
        raise ValueError(f"relevance_draws must be >= 1, got {relevance_draws}")
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau (edit-mask threshold on the guidance map in [0, 1]) must be in [0, 1], got {tau}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    return float(relevance_strength), int(relevance_draws), float(tau), prior


def robust_normalise(maps: torch.Tensor) -> torch.Tensor:
    """(B, h, w) >= 0 -> [0, 1] per item: clip at Q3 + 1.5 IQR (Tukey's upper fence), then min-max."""
    flat = maps.flatten(1).float()
    q1, q3 = torch.quantile(flat, 0.25, dim=1), torch.quantile(flat, 0.75, dim=1)
    fence = (q3 + 1.5 * (q3 - q1)).view(-1, 1)
    clipped = torch.minimum(flat, fence)
    lo, hi = clipped.min(dim=1, keepdim=True).values, clipped.max(dim=1, keepdim=True).values
    out = (clipped - lo) / (hi - lo).clamp_min(1e-12)
    return out.view_as(maps)


class RegionSpecificEditMaker(InvertThenEditMaker):
    """Plain DDIM confined to where the finding's relevance and its pseudo mask agree (`--variant rse`).

    relevance_strength: t_rel as a share of the schedule (0.5: the middle timestep of the T steps).
    relevance_draws: seeded noise draws averaged into R (> 1; the paper uses 1).
    tau: threshold on G = M * R for the edit mask (0.1).
    prior: "anatomy" (the finding's anatomical prior on an Otsu chest box) or "none" (M = full image)
        when the caller passes no masks.
    """

    name = "rse"
    default_cache_size = 64

    def __init__(
        self,
        pipe_or_latent_diffusion,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        strength: float = DEFAULT_STRENGTH,
        *,
        relevance_strength: float = 0.5,
        relevance_draws: int = 4,
        tau: float = 0.1,
        prior: str = "anatomy",
        paste_query_outside_mask: bool = False,
        **settings,
    ) -> None:
        super().__init__(pipe_or_latent_diffusion, num_inference_steps, guidance_scale, strength,
                         paste_query_outside_mask=paste_query_outside_mask, **settings)
        self.relevance_strength, self.relevance_draws, self.tau, self.prior = checked_region_settings(
            relevance_strength, relevance_draws, tau, prior, self.num_inference_steps)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "relevance_strength": self.relevance_strength,
                "relevance_draws": self.relevance_draws, "tau": self.tau, "prior": self.prior,
                "paste_query_outside_mask": self.paste_query_outside_mask}

    # -- the relevance map ---------------------------------------------------------------------
    @torch.no_grad()
    def relevance_maps(self, inversion: Inversion, target_prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
        """R (B, h, w) in [0, 1] on the latent grid: where the edited prompt changes the noise prediction."""
        ld = self.ld
        b, d = inversion.batch_size, self.relevance_draws
        ld.scheduler.set_timesteps(self.num_inference_steps)
        index = strength_to_start_index(self.relevance_strength, self.num_inference_steps)
        t = ld.scheduler.timesteps[index]
        z0 = inversion.trajectory[0].to(ld.device, ld.dtype)  # the query's clean latent z*_0
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn((d, *z0.shape), generator=generator, dtype=torch.float32).to(ld.device, ld.dtype)
        z_t = ld.scheduler.add_noise(z0.expand(d, *z0.shape).reshape(d * b, *z0.shape[1:]),
                                     noise.reshape(d * b, *z0.shape[1:]), t.repeat(d * b))
        cond_source = inversion.cond_embeds.to(ld.device, ld.dtype).repeat(d, 1, 1)
        cond_target = ld.encode_prompts(list(target_prompts)).repeat(d, 1, 1)
        eps_source, eps_target = ld.eps_pair(z_t, t, cond_source, cond_target)
        difference = (eps_source.float() - eps_target.float()).abs().sum(dim=1)  # (d * B, h, w)
        return robust_normalise(difference.view(d, b, *difference.shape[1:]).mean(dim=0))

    def _pseudo_masks(self, images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str]) -> torch.Tensor:
        return pseudo_masks(images, source_prompts, target_prompts, self.prior)

    def _edit_region(self, images, inversion, source_prompts, target_prompts, masks, seed):
        relevance = self.relevance_maps(inversion, target_prompts, seed).unsqueeze(1)  # (B, 1, h, w)
        if masks is None:
            masks = self._pseudo_masks(images, source_prompts, target_prompts)
        return guidance_and_edit_mask(relevance, masks, self.tau, tuple(images.shape[-2:]))


def pseudo_masks(images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str],
                 prior: str = "anatomy") -> torch.Tensor:
    """M (B, 1, H, W) in {0, 1}: the removed finding's anatomical prior on the query's Otsu chest box,
    or everywhere (prior "none", nothing or several findings removed, a finding without a prior)."""
    size = tuple(images.shape[-2:])
    masks = []
    for image, source, target in zip(images, source_prompts, target_prompts, strict=True):
        removed = removed_findings(source, target)
        if prior == "none" or len(removed) != 1:
            masks.append(np.ones(size, dtype=bool))
            continue
        box = estimate_chest_box(image[0].detach().cpu().numpy())
        masks.append(anatomical_prior(removed[0], size, box))
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def guidance_and_edit_mask(relevance: torch.Tensor, masks: torch.Tensor, tau: float,
                           query_size: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """G = M * R and the edit mask 1(G >= tau) on the latent grid of R (B, 1, h, w); returns (edit mask,
    extras {"guidance_map", "edit_mask"} at the query's size, (B, 1, H, W), for the run folder)."""
    latent_size = tuple(relevance.shape[-2:])
    prior = F.interpolate(masks.float(), size=latent_size, mode="area").to(relevance)
    guidance_map = prior * relevance  # G = M * R (seed 001)
    edit_mask = (guidance_map >= tau).float()
    extras = {
        "guidance_map": F.interpolate(guidance_map, size=query_size, mode="bilinear", align_corners=False).cpu(),
        "edit_mask": F.interpolate(edit_mask, size=query_size, mode="nearest").cpu(),
    }
    return edit_mask, extras
