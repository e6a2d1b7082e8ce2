"""The inversion-and-sampling base every diffusion counterfactual variant builds on.

`InvertThenEditMaker` is plain DDIM (CVLM, seed 003): DDIM-invert the query latent with its source
prompt at guidance 1 (the pivot trajectory z*_0 .. z*_T), then sample with the target prompt under
classifier-free guidance omega from z*_k, k = T - round((1 - delta) T) for denoising strength delta
(seed 000). It owns the one inversion cache (per image hash, source prompt, checkpoint, settings),
the one sampling loop (`guided_ddim_loop` in `diffusion.py`) and the one image hash
(`inversion_cache.image_hash`). Variants override small hooks, the way a pytorch-grad-cam method
overrides one method of its base class:

- `_fit(trajectory, cond_embeds) -> tensors`: what the inversion fits besides the pivot (NTI's
  per-step null embeddings, direct inversion's pivot noise predictions); default nothing;
- `_uncond_steps(inversion) -> (T, B, L, D)`: the unconditional embedding at each sampling step;
  default the empty prompt's;
- `_step_offsets(inversion, rows, guidance) -> offset(i) | None`: a latent added after each step;
- `inversion_settings()`: what the cache key records about the inversion (add your fitted settings);
- `_edit_region(images, inversion, source_prompts, target_prompts, masks, seed) -> (masks, extras)`:
  where the edit may act (default: the caller's `masks`, or everywhere); region-specific editing
  computes its guidance map here.

Masks mean the same in every maker (`CounterfactualMaker.make`): the edit is confined to the mask;
outside it the latent is reset to the query's pivot at every step and the query's pixels are pasted
back (`paste_query_outside_mask`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cyclex.counterfactuals.attention_control import (
    AttentionControlConfig,
    PromptToPromptController,
    prompt_to_prompt,
)
from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
from cyclex.counterfactuals.diffusion import LatentDiffusion, guided_ddim_loop
from cyclex.counterfactuals.inversion_cache import InversionCache, inversion_key

logger = logging.getLogger(__name__)

# Paper defaults (seed 003: T = 50; seed 000: omega = 7.5 .. 10, delta 1.0).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 1.0

# Batch dimension of each per-inversion tensor (removed when stored per item in the cache).
_BATCH_DIM = {"trajectory": 1, "cond_embeds": 0, "null_embeds": 1, "pivot_eps": 1, "null_loss": 1}


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


def strength_to_start_index(strength: float, num_steps: int) -> int:
    """Denoising strength delta in (0, 1] -> first sampling step: round((1 - delta) * T)."""
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength (denoising strength delta) must be in (0, 1], got {strength}")
    start = int(round((1.0 - float(strength)) * num_steps))
    return min(start, num_steps - 1)


@dataclass
class Inversion:
    """What an inversion leaves for editing, for B images.

    trajectory  (T + 1, B, C, h, w): pivot z*_0 .. z*_T (guidance-1 DDIM inversion).
    cond_embeds (B, L, D): source prompt embeddings.
    null_embeds (T, B, L, D) | None: per-step unconditional embeddings (NTI) indexed by step i.
    pivot_eps   (T, B, 2, C, h, w) | None: [eps_uncond, eps_cond] at z*_{T-i} (direct inversion).
    null_loss   (T, B) | None: NTI's final MSE per step (diagnostic).
    from_cache: per item, whether its inversion was in the cache before this call.
    """

    source_prompts: list[str]
    trajectory: torch.Tensor
    cond_embeds: torch.Tensor
    null_embeds: torch.Tensor | None = None
    pivot_eps: torch.Tensor | None = None
    null_loss: torch.Tensor | None = None
    unet_calls: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    from_cache: list[bool] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.trajectory.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("trajectory", "cond_embeds", "null_embeds", "pivot_eps", "null_loss")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class InvertThenEditMaker(CounterfactualMaker):
    """Invert once per (image, source prompt), edit with the target prompt at any strength/guidance.

    With the default hooks this is plain DDIM (`DDIMCounterfactualMaker` in `ddim.py` is exactly it).
    pipe_or_latent_diffusion: a StableDiffusionPipeline or a ready `LatentDiffusion`.
    num_inference_steps: T (50). guidance_scale: omega for sampling (7.5). strength: delta in (0, 1].
    checkpoint: names the weights in the inversion cache key (beside the pipeline's path) and the
        settings; `set_checkpoint_id` sets it once the engine knows which UNet was loaded. Makers that
        share a cache and a checkpoint name share their guidance-1 pivot trajectories.
    cache: an `InversionCache` to share between makers (the search's siblings share one); default a
        fresh in-memory one of `cache_size` entries (default: the class's `default_cache_size`).
    attention_control: prompt-to-prompt cross-attention control while editing (None: plain sampling).
    paste_query_outside_mask: with `masks`, paste the query's pixels back outside the mask after decoding.
    """

    name = "invert-edit"
    default_cache_size = 512  # inversions kept in memory when no shared cache is given

    def __init__(
        self,
        pipe_or_latent_diffusion,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        strength: float = DEFAULT_STRENGTH,
        *,
        checkpoint: str = "default",
        cache: InversionCache | None = None,
        cache_size: int | None = None,
        attention_control: AttentionControlConfig | None = None,
        paste_query_outside_mask: bool = True,
    ) -> None:
        if float(guidance_scale) < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        strength_to_start_index(strength, int(num_inference_steps))  # validates
        self.ld = as_latent_diffusion(pipe_or_latent_diffusion, int(num_inference_steps))
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.strength = float(strength)
        self.checkpoint = str(checkpoint)
        size = self.default_cache_size if cache_size is None else cache_size
        self.cache = cache if cache is not None else InversionCache(max_items=size)
        self.attention_control = attention_control
        self.paste_query_outside_mask = bool(paste_query_outside_mask)
        self.inversions_run = 0  # images inverted (cache misses), over the maker's life

    # -- settings ------------------------------------------------------------------------------
    @property
    def diffusion(self) -> LatentDiffusion:
        """The latent-diffusion primitives this maker runs on (also `ld`)."""
        return self.ld

    @property
    def checkpoint_id(self) -> str:
        """Alias of `checkpoint`."""
        return self.checkpoint

    @checkpoint_id.setter
    def checkpoint_id(self, value: str) -> None:
        self.checkpoint = str(value)

    def set_checkpoint_id(self, checkpoint_id: str) -> None:
        self.checkpoint = str(checkpoint_id)

    def inversion_settings(self) -> dict[str, Any]:
        return {"method": self.name, **self.ld.describe()}

    def settings(self) -> dict[str, Any]:
        return {
            "variant": self.name,
            "steps": self.num_inference_steps,
            "guidance": self.guidance_scale,
            "strength": self.strength,
            "checkpoint": self.checkpoint,
            "attention_control": None if self.attention_control is None else vars(self.attention_control).copy(),
            **{k: v for k, v in self.inversion_settings().items() if k not in ("method", "model", "steps")},
        }

    def replace(self, **changes: Any) -> InvertThenEditMaker:
        """A shallow copy sharing the model, with some attributes changed (e.g. `cache=InversionCache()`)."""
        clone = copy.copy(self)
        for name, value in changes.items():
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
            setattr(clone, name, value)
        return clone

    def clear_cache(self) -> None:
        """Forget every cached inversion (in memory; a disk-backed cache keeps its files)."""
        self.cache.clear()

    # -- hooks ---------------------------------------------------------------------------------
    def _fit(self, trajectory: torch.Tensor, cond_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def _uncond_steps(self, inv: Inversion) -> torch.Tensor:
        """(T, B, L, D) unconditional embeddings used at each sampling step."""
        empty = self.ld.empty_prompt_embeds(inv.batch_size)
        return empty.unsqueeze(0).expand(self.num_inference_steps, -1, -1, -1)

    def _step_offsets(self, inv: Inversion, rows: torch.Tensor, guidance: torch.Tensor) -> Callable[[int], torch.Tensor] | None:
        return None

    def _edit_region(
        self, images: torch.Tensor, inversion: Inversion, source_prompts: Sequence[str],
        target_prompts: Sequence[str], masks: torch.Tensor | None, seed: int,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(masks (B, 1, H', W') in {0, 1} or None for everywhere, extra maps (B, ...)) of this request."""
        return masks, {}

    # -- inversion -----------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, images: torch.Tensor, source_prompts: Sequence[str]) -> Inversion:
        """images (B, 1, H, W) in [0, 1] -> Inversion; cached per item, each missing (image, prompt)
        inverted once, all of them in one batch."""
        self.check_request(images, source_prompts, source_prompts)
        start_time, start_calls = time.perf_counter(), self.ld.unet_calls
        settings = self.inversion_settings()
        keys = [inversion_key(images[i], p, self.checkpoint, settings) for i, p in enumerate(source_prompts)]
        items: list[dict[str, torch.Tensor] | None] = [self.cache.get(k) for k in keys]
        from_cache = [item is not None for item in items]
        first_of_key: dict[str, int] = {}
        for i, item in enumerate(items):
            if item is None:
                first_of_key.setdefault(keys[i], i)
        if first_of_key:
            rows = list(first_of_key.values())
            fresh = self._invert_batch(images[rows], [source_prompts[i] for i in rows])
            self.inversions_run += len(rows)
            for j, (key, i) in enumerate(first_of_key.items()):
                item = {n: t.select(_BATCH_DIM[n], j) for n, t in fresh.items()}
                self.cache.put(key, item, {"prompt": source_prompts[i], "checkpoint": self.checkpoint, **settings})
            fresh_items = {key: {n: t.select(_BATCH_DIM[n], j) for n, t in fresh.items()}
                           for j, key in enumerate(first_of_key)}
            items = [item if item is not None else fresh_items[keys[i]] for i, item in enumerate(items)]
        stacked = {
            n: torch.stack([item[n] for item in items], dim=_BATCH_DIM[n]).to(self.ld.device) for n in items[0]
        }
        return Inversion(
            source_prompts=list(source_prompts),
            unet_calls=self.ld.unet_calls - start_calls,
            seconds=time.perf_counter() - start_time,
            cache_hits=sum(from_cache),
            from_cache=from_cache,
            settings=settings,
            **stacked,
        )

    def _pivot(self, latents: torch.Tensor, cond: torch.Tensor, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(T + 1, B, C, h, w) guidance-1 DDIM trajectory, shared by every method and null setting."""
        settings = {"method": "ddim-pivot", **self.ld.describe()}
        keys = [inversion_key(images[i], p, self.checkpoint, settings) for i, p in enumerate(prompts)]
        cached = [self.cache.get(k) for k in keys]
        if all(c is not None for c in cached):
            return torch.stack([c["trajectory"] for c in cached], dim=1).to(self.ld.device, self.ld.dtype)
        trajectory = torch.stack(self.ld.ddim_invert(latents, cond, guidance=1.0))
        for j, key in enumerate(keys):
            self.cache.put(key, {"trajectory": trajectory[:, j]})
        return trajectory

    def _invert_batch(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        size = self.ld.image_size
        latents = self.ld.encode_images(resize_images(images.float().clamp(0, 1), (size, size)))
        cond = self.ld.encode_prompts(prompts)
        trajectory = self._pivot(latents, cond, images, prompts)
        return {"trajectory": trajectory, "cond_embeds": cond, **self._fit(trajectory, cond)}

    # -- editing -------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(
        self,
        inversion: Inversion,
        target_prompts: Sequence[str],
        guidances: Sequence[float] | None = None,
        strength: float | None = None,
        masks: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Sample every (item, guidance) pair in one batch -> images (B, G, 1, H, W) in [0, 1].

        H, W = output_size, or the model's image size.
        strength delta starts at step round((1 - delta) T) on the same pivot trajectory; masks
        (B, 1, H, W) in {0, 1} (any H, W: area-resized to the latent grid, > 0 counts as inside) keep
        the latent outside the mask on the pivot: after step i the sample sits at timesteps[i + 1], so
        it is reset to the pivot latent of that noise level (z*_0 after the last step), as diffusers'
        inpainting pipeline does.
        """
        b = inversion.batch_size
        z0 = self.edit_latents(inversion, target_prompts, guidances, strength, masks)
        images = self.ld.decode_latents(z0).float()
        if output_size is not None:
            images = resize_images(images, tuple(output_size))
        return images.reshape(b, -1, *images.shape[1:])

    @torch.no_grad()
    def edit_latents(
        self,
        inversion: Inversion,
        target_prompts: Sequence[str],
        guidances: Sequence[float] | None = None,
        strength: float | None = None,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`edit` before decoding: z_0 (B * G, C, h, w), row r = item r // G, guidance r % G."""
        b = inversion.batch_size
        if len(target_prompts) != b:
            raise ValueError(f"need {b} target prompts (one per inverted image), got {len(target_prompts)}")
        guidance_list = [float(g) for g in (guidances if guidances is not None else [self.guidance_scale])]
        if not guidance_list:
            raise ValueError("guidances must hold at least one guidance scale")
        g = len(guidance_list)
        T = self.num_inference_steps
        start = strength_to_start_index(self.strength if strength is None else strength, T)
        rows = torch.arange(b, device=self.ld.device).repeat_interleave(g)  # row r = item r // G
        guidance = torch.tensor(guidance_list, device=self.ld.device).repeat(b)
        z_start = inversion.trajectory[T - start][rows]
        cond_target = self.ld.encode_prompts(target_prompts)[rows]
        uncond = self._uncond_steps(inversion)[:, rows]
        offsets = self._step_offsets(inversion, rows, guidance)
        keep = self._keep_outside(inversion, rows, masks) if masks is not None else None
        if self.attention_control is None:
            return guided_ddim_loop(self.ld, z_start, cond_target, uncond, guidance, start, offsets, keep)
        return self._edit_with_attention_control(
            inversion, target_prompts, rows, z_start, cond_target, uncond, guidance, start, offsets, keep
        )

    def _keep_outside(self, inv: Inversion, rows: torch.Tensor, masks: torch.Tensor):
        self.check_masks(masks, inv.batch_size)
        latent_mask = F.interpolate(masks.float(), size=inv.trajectory.shape[-2:], mode="area").to(self.ld.device)
        latent_mask = (latent_mask > 0).to(self.ld.dtype)[rows]
        T = self.num_inference_steps

        def keep(i: int, z: torch.Tensor) -> torch.Tensor:
            pivot = inv.trajectory[T - i - 1][rows].to(z.dtype)  # timesteps[i + 1]'s noise level
            if z.shape[0] != pivot.shape[0]:  # P2P layout [source; target]: only the target is masked
                n = pivot.shape[0]
                return torch.cat([z[:n], pivot + latent_mask * (z[n:] - pivot)])
            return pivot + latent_mask * (z - pivot)

        return keep

    def _edit_with_attention_control(self, inv, target_prompts, rows, z_start, cond_target, uncond, guidance, start, offsets, keep):
        """Prompt-to-prompt: source and target branches side by side, [source N; target N] rows."""
        tokenizer = self.ld.pipe.tokenizer
        row_list = rows.tolist()
        controller = PromptToPromptController.from_prompts(
            tokenizer,
            [inv.source_prompts[r] for r in row_list],
            [target_prompts[r] for r in row_list],
            num_steps=self.num_inference_steps,
            config=self.attention_control,
            latent_size=tuple(z_start.shape[-2:]),
        )
        cond_source = inv.cond_embeds[rows]
        both_offsets = None
        if offsets is not None:
            def both_offsets(i: int) -> torch.Tensor:
                off = offsets(i)
                return torch.cat([off, off])
        with prompt_to_prompt(self.ld.unet, controller):
            z = guided_ddim_loop(
                self.ld,
                torch.cat([z_start, z_start]),
                torch.cat([cond_source, cond_target]),
                torch.cat([uncond, uncond], dim=1),
                torch.cat([guidance, guidance]),
                start,
                both_offsets,
                keep,
                controller,
            )
        return z[z_start.shape[0]:]

    # -- the maker interface -------------------------------------------------------------------
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
        if masks is not None:
            self.check_masks(masks, images.shape[0], tuple(images.shape[-2:]))
        start_time, start_calls = time.perf_counter(), self.ld.unet_calls
        torch.manual_seed(seed)  # eta = 0 is deterministic; fixed anyway for any stochastic module
        # 2. Invert (cached; each unique image + source prompt once)
        inversion = self.invert(images, source_prompts)
        # 3. Where the edit may act (the caller's masks; region-specific editing computes its own)
        region, extras = self._edit_region(images, inversion, source_prompts, target_prompts, masks, seed)
        # 4. Sample every request in one batch with the target prompts, back at the query's size
        query_size = tuple(images.shape[-2:])
        cf = self.edit(inversion, target_prompts, masks=region, output_size=query_size)[:, 0].cpu().float()
        # 5. Keep the query's pixels outside the mask
        if region is not None and self.paste_query_outside_mask:
            m = region.float().cpu()
            if tuple(m.shape[-2:]) != query_size:
                m = F.interpolate(m, size=query_size, mode="nearest")
            m = m.clamp(0, 1)
            cf = m * cf + (1 - m) * images.to(cf)
        b = images.shape[0]
        calls = self.ld.unet_calls - start_calls
        seconds = time.perf_counter() - start_time
        start_index = strength_to_start_index(self.strength, self.num_inference_steps)
        details = [
            {
                **self.settings(),
                "seed": int(seed),
                "start_index": start_index,
                "inversion_cached": bool(cached),
                "unet_calls": calls / b,
                "seconds": seconds / b,
                "unet_calls_batch": calls,
                "seconds_batch": round(seconds, 4),
                "batch_size": b,
            }
            for cached in inversion.from_cache
        ]
        extras = dict(extras)
        if inversion.null_loss is not None:
            extras["null_text_loss"] = inversion.null_loss.transpose(0, 1).float().cpu()  # (B, T)
        logger.debug("%s maker: %d requests, %d UNet evaluations, %.2fs", self.name, b, calls, seconds)
        return CounterfactualOutput(images=cf, details=details, extras=extras)
