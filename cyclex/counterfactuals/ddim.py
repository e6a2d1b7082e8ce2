"""Plain DDIM counterfactuals, the CVLM maker (seed 003, SPEC section 1).

For each request: DDIM (eta = 0) inversion of the query latent with its source prompt (T steps,
guidance 1), then DDIM sampling from the inverted latent with the edited prompt under
classifier-free guidance omega. Denoising strength delta (seed 000) picks where sampling starts on
the same trajectory: delta = 1 starts from z_T, delta < 1 from z_k with k = round(delta * T).

Inversions are cached by (sha1 of the image bytes, source prompt, steps, inversion guidance,
checkpoint id): the findings of one image share one inversion, and all requests of one `make`
call go through the UNet together (one inversion batch for the new keys, one sampling batch).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
from cyclex.counterfactuals.diffusion import LatentDiffusion

logger = logging.getLogger(__name__)

# Paper defaults (seed 003: T = 50; seed 000: omega = 7.5 .. 10, delta 1.0).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 1.0


def image_sha1(image: torch.Tensor) -> str:
    """sha1 of a float32 image's bytes: identical pixels give identical keys across calls."""
    array = image.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, *size); bilinear with antialiasing, identity when sizes match."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def as_latent_diffusion(pipe_or_latent_diffusion, num_inference_steps: int) -> LatentDiffusion:
    if isinstance(pipe_or_latent_diffusion, LatentDiffusion):
        if pipe_or_latent_diffusion.num_inference_steps != num_inference_steps:
            raise ValueError(
                f"LatentDiffusion runs {pipe_or_latent_diffusion.num_inference_steps} steps but the maker "
                f"was asked for num_inference_steps={num_inference_steps}"
            )
        return pipe_or_latent_diffusion
    return LatentDiffusion(pipe_or_latent_diffusion, num_inference_steps=num_inference_steps)


class DDIMCounterfactualMaker(CounterfactualMaker):
    """CVLM counterfactuals: DDIM-invert with the source prompt, resample with the target prompt.

    pipe_or_latent_diffusion: a StableDiffusionPipeline or a ready `LatentDiffusion`.
    num_inference_steps: T (50). guidance_scale: omega for sampling (7.5). strength: delta in (0, 1].
    inversion_guidance: guidance for the inversion (1, as seed 000 / NTI prescribe).
    checkpoint_id: names the weights in the inversion cache key (default: the pipeline's path).
    cache_size: inversions kept (least recently used dropped first).
    masks passed to `make` (B, 1, H, W) in {0, 1} keep the query outside the mask (pixel blend).
    """

    name = "ddim"

    def __init__(
        self,
        pipe_or_latent_diffusion,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        strength: float = DEFAULT_STRENGTH,
        *,
        inversion_guidance: float = 1.0,
        checkpoint_id: str | None = None,
        cache_size: int = 64,
    ) -> None:
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength (denoising strength delta) must be in (0, 1], got {strength}")
        if float(guidance_scale) < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.diffusion = as_latent_diffusion(pipe_or_latent_diffusion, int(num_inference_steps))
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.strength = float(strength)
        self.inversion_guidance = float(inversion_guidance)
        self.checkpoint_id = checkpoint_id or self.diffusion.describe()["model"]
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self.inversions_run = 0

    # -- settings ------------------------------------------------------------------------------
    @property
    def inversion_index(self) -> int:
        """k = round(delta * T): the trajectory latent sampling starts from (at least 1)."""
        return max(1, round(self.strength * self.num_inference_steps))

    def settings(self) -> dict[str, Any]:
        return {
            "variant": self.name,
            "steps": self.num_inference_steps,
            "guidance": self.guidance_scale,
            "strength": self.strength,
            "inversion_guidance": self.inversion_guidance,
            "checkpoint": self.checkpoint_id,
        }

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- inversion with cache ----------------------------------------------------------------------
    def _cache_key(self, image: torch.Tensor, source_prompt: str) -> tuple:
        return (image_sha1(image), source_prompt, self.num_inference_steps, self.inversion_guidance, self.checkpoint_id)

    def invert(self, images: torch.Tensor, source_prompts: Sequence[str]) -> tuple[list[list[torch.Tensor]], list[bool]]:
        """Trajectories z_0..z_T per request (cached); images already at the model's size.

        Returns (trajectories, from_cache) with one entry per request. Keys missing from the cache
        are inverted in one batch, each unique (image, prompt) once.
        """
        keys = [self._cache_key(img, p) for img, p in zip(images, source_prompts, strict=True)]
        from_cache = [k in self._cache for k in keys]
        missing: dict[tuple, int] = {}
        for i, k in enumerate(keys):
            if k not in self._cache and k not in missing:
                missing[k] = i
        if missing:
            rows = list(missing.values())
            latents = self.diffusion.encode_images(images[rows])
            cond = self.diffusion.encode_prompts([source_prompts[i] for i in rows])
            trajectory = self.diffusion.ddim_invert(latents, cond, guidance=self.inversion_guidance)
            self.inversions_run += len(rows)
            for j, k in enumerate(missing):
                self._cache[k] = [z[j : j + 1].detach() for z in trajectory]
        out = []
        for k in keys:
            self._cache.move_to_end(k)
            out.append(self._cache[k])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out, from_cache

    # -- the maker ------------------------------------------------------------------------------
    @torch.no_grad()
    def make(
        self,
        images: torch.Tensor,
        source_prompts: Sequence[str],
        target_prompts: Sequence[str],
        *,
        masks: torch.Tensor | None = None,
        seed: int = 0,
    ) -> CounterfactualOutput:
        """images (B, 1, H, W) in [0, 1] -> counterfactuals (B, 1, H, W) in [0, 1]."""
        # 1. Check inputs
        self.check_request(images, source_prompts, target_prompts)
        if masks is not None and (masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[1] != 1
                                  or masks.shape[-2:] != images.shape[-2:]):
            raise ValueError(f"masks must be (B, 1, H, W) like images {tuple(images.shape)}, got {tuple(masks.shape)}")
        start = time.perf_counter()
        calls_before = self.diffusion.unet_calls
        torch.manual_seed(seed)  # eta = 0 is deterministic; fixed anyway for any stochastic module
        # 2. Bring queries to the tailored SD's resolution
        query_size = tuple(images.shape[-2:])
        model_size = (self.diffusion.image_size, self.diffusion.image_size)
        model_images = resize_images(images.float().clamp(0, 1), model_size)
        # 3. Invert (cached; each unique image + source prompt once)
        trajectories, from_cache = self.invert(model_images, list(source_prompts))
        # 4. Sample every request in one batch from z_k with the target prompts
        k = self.inversion_index
        start_index = self.num_inference_steps - k
        start_latents = torch.cat([traj[k] for traj in trajectories])
        cond = self.diffusion.encode_prompts(list(target_prompts))
        z0 = self.diffusion.ddim_sample(start_latents, cond, guidance=self.guidance_scale, start_index=start_index)
        # 5. Decode, back to the query size, keep the query outside the mask
        counterfactuals = resize_images(self.diffusion.decode_latents(z0).cpu(), query_size)
        if masks is not None:
            m = masks.to(counterfactuals).clamp(0, 1)
            counterfactuals = m * counterfactuals + (1 - m) * images.to(counterfactuals)
        seconds = time.perf_counter() - start
        calls = self.diffusion.unet_calls - calls_before
        b = images.shape[0]
        details = [
            {
                **self.settings(),
                "seed": int(seed),
                "start_index": start_index,
                "inversion_cached": bool(cached),
                "unet_calls_batch": calls,
                "seconds_batch": round(seconds, 4),
                "batch_size": b,
            }
            for cached in from_cache
        ]
        logger.debug("ddim maker: %d requests, %d UNet evaluations, %.2fs", b, calls, seconds)
        return CounterfactualOutput(images=counterfactuals.float(), details=details)
