"""Null-text inversion counterfactuals (Mokady et al. 2023; seed 000's H_null settings).

Steps (seed 000, section 2 of SPEC):
1. DDIM-invert the query latent with its structured prompt at guidance 1: the pivot trajectory
   z*_0 .. z*_T (`LatentDiffusion.ddim_invert`).
2. For each sampling step i (timestep t_i, from z*_T down), optimise the unconditional ("null")
   text embedding phi_i, initialised from phi_{i-1} (phi_{-1} = embedding of ""), with Adam at
   lr = 1e-2 * (1 - i / 100) (the reference code), so that the classifier-free-guided DDIM step
       z_{i+1} = DDIM(z_i, eps(z_i, phi_i) + w (eps(z_i, c) - eps(z_i, phi_i)), t_i)
   lands on the pivot z*_{T-i-1} (MSE). At most `inner_steps` iterations; stop early once the loss
   is below `early_stop_eps + i * 2e-5` (reference code). Then z_{i+1} is the guided step with phi_i.
   H_null = (inner_steps, early_stop_eps): "default" (10, 1e-5), "underfit" (8, 5e-4).
3. Sample with the *edited* prompt (finding removed) from z*_{T - start} using phi_i at step i.

Only phi gets gradients (`torch.autograd.grad` on phi alone, under a local `torch.enable_grad()`),
the optimisation runs in float32 (run the pipeline in fp32: NTI diverges in half precision).

`InvertThenEditMaker` is the shared machinery of every "invert once, edit many times" maker (NTI
here, negative-prompt and direct inversion in `fast_inversion.py`): per-item inversion cache, one
inversion serving every strength (start later on the same trajectory), several guidance scales in
one UNet batch, optional prompt-to-prompt control and masked editing.
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

import cyclex.counterfactuals.registry_nti  # noqa: F401  (registers "nti", "negative-prompt", "direct")
from cyclex.counterfactuals.attention_control import (
    AttentionControlConfig,
    PromptToPromptController,
    prompt_to_prompt,
)
from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
from cyclex.counterfactuals.ddim import as_latent_diffusion, resize_images
from cyclex.counterfactuals.diffusion import LatentDiffusion
from cyclex.counterfactuals.inversion_cache import InversionCache, inversion_key

logger = logging.getLogger(__name__)

# H_null = (inner iterations, early-stop error); SPEC section 2 (the paper prints them transposed).
NULL_SETTINGS: dict[str, tuple[int, float]] = {"default": (10, 1e-5), "underfit": (8, 5e-4)}
# Optimisation-free choices of the unconditional branch (fast_inversion.py), usable wherever a null
# setting is: negative-prompt inversion (null := source prompt) and direct inversion (offsets).
FAST_NULL_SETTINGS: tuple[str, ...] = ("negative-prompt", "direct")
# Reference code: the early-stop bound loosens by 2e-5 per step.
EARLY_STOP_GROWTH = 2e-5

# Batch dimension of each per-inversion tensor (removed when stored per item in the cache).
_BATCH_DIM = {"trajectory": 1, "cond_embeds": 0, "null_embeds": 1, "pivot_eps": 1, "null_loss": 1}


def resolve_null_setting(setting: str | Sequence) -> tuple[str, int, float]:
    """"default" | "underfit" | (inner_steps, early_stop_eps) -> (label, inner_steps, eps)."""
    if isinstance(setting, str):
        if setting not in NULL_SETTINGS:
            raise ValueError(f"null_setting must be one of {sorted(NULL_SETTINGS)} or (inner_steps, eps), got {setting!r}")
        inner, eps = NULL_SETTINGS[setting]
        return setting, inner, eps
    try:
        inner, eps = setting
        inner, eps = int(inner), float(eps)
    except (TypeError, ValueError) as err:
        raise ValueError(f"null_setting must be a name or (inner_steps, early_stop_eps), got {setting!r}") from err
    if inner < 1 or eps < 0:
        raise ValueError(f"null_setting needs inner_steps >= 1 and eps >= 0, got {setting!r}")
    return f"({inner}, {eps:g})", inner, eps


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
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.trajectory.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("trajectory", "cond_embeds", "null_embeds", "pivot_eps", "null_loss")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _unet_pair(ld: LatentDiffusion, latents: torch.Tensor, t, uncond: torch.Tensor, cond: torch.Tensor):
    """(eps_uncond, eps_cond) from one UNet pass of 2N rows; counted on the LatentDiffusion."""
    n = latents.shape[0]
    model_in = ld.scheduler.scale_model_input(torch.cat([latents, latents]), t)
    both = ld.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond]).to(ld.dtype)).sample
    ld.unet_calls += 2 * n
    ld.unet_forward_passes += 1
    return both.chunk(2)


def _unet_single(ld: LatentDiffusion, latents: torch.Tensor, t, embeds: torch.Tensor) -> torch.Tensor:
    eps = ld.unet(ld.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=embeds.to(ld.dtype)).sample
    ld.unet_calls += latents.shape[0]
    ld.unet_forward_passes += 1
    return eps


def guided_ddim_loop(
    ld: LatentDiffusion,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond_steps: torch.Tensor,
    guidance: torch.Tensor,
    start_index: int = 0,
    step_offset: Callable[[int], torch.Tensor] | None = None,
    keep_outside: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    controller: PromptToPromptController | None = None,
) -> torch.Tensor:
    """DDIM (eta = 0) sampling with a guidance scale per row and an unconditional embedding per step.

    latents (N, C, h, w) at timesteps[start_index]; cond (N, L, D); uncond_steps (T, N, L, D);
    guidance (N,). Per step: eps = eps_u + w (eps_c - eps_u) (one UNet pass of 2N rows), DDIM step,
    then `+ step_offset(i)` (direct inversion), the P2P local blend, `keep_outside` (masked edit).
    Returns z_0 (N, C, h, w). `LatentDiffusion.ddim_sample` is the same loop for one scalar
    guidance; this one exists for guidance batches, offsets and attention control.
    """
    T = ld.num_inference_steps
    ld.scheduler.set_timesteps(T)
    w = guidance.to(ld.device, torch.float32).view(-1, 1, 1, 1)
    z = latents.to(ld.device, ld.dtype)
    cond = cond.to(ld.device, ld.dtype)
    for i in range(int(start_index), T):
        t = ld.scheduler.timesteps[i]
        if controller is not None:
            controller.begin_step(i)
        eps_u, eps_c = _unet_pair(ld, z, t, uncond_steps[i].to(ld.device, ld.dtype), cond)
        eps = (eps_u.float() + w * (eps_c.float() - eps_u.float())).to(ld.dtype)
        z = ld.scheduler.step(eps, t, z, eta=0.0).prev_sample
        if step_offset is not None:
            z = z + step_offset(i).to(z.dtype)
        if controller is not None:
            z = controller.local_blend(z)
        if keep_outside is not None:
            z = keep_outside(i, z)
    return z


class InvertThenEditMaker(CounterfactualMaker):
    """Invert once per (image, source prompt), edit with the target prompt at any strength/guidance.

    Subclasses define `_fit(trajectory, cond_embeds) -> extra tensors`, `_uncond_steps(inv)` and
    optionally `_step_offsets(...)`, plus `inversion_settings()` (the cache key's settings).
    """

    name = "invert-edit"

    def __init__(
        self,
        pipe_or_latent_diffusion,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        *,
        checkpoint: str = "default",
        cache: InversionCache | None = None,
        attention_control: AttentionControlConfig | None = None,
    ) -> None:
        self.ld = as_latent_diffusion(pipe_or_latent_diffusion, num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        strength_to_start_index(strength, self.num_inference_steps)  # validates
        self.strength = float(strength)
        self.checkpoint = str(checkpoint)
        self.cache = cache if cache is not None else InversionCache()
        self.attention_control = attention_control

    # -- settings ------------------------------------------------------------------------------
    @property
    def checkpoint_id(self) -> str:
        """Alias of `checkpoint` (the name `CyclicExplainer.from_pretrained` sets on makers)."""
        return self.checkpoint

    @checkpoint_id.setter
    def checkpoint_id(self, value: str) -> None:
        self.checkpoint = str(value)

    def inversion_settings(self) -> dict[str, Any]:
        return {"method": self.name, **self.ld.describe()}

    def settings(self) -> dict[str, Any]:
        return {
            "variant": self.name,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
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

    # -- hooks ---------------------------------------------------------------------------------
    def _fit(self, trajectory: torch.Tensor, cond_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def _uncond_steps(self, inv: Inversion) -> torch.Tensor:
        """(T, B, L, D) unconditional embeddings used at each sampling step."""
        empty = self.ld.empty_prompt_embeds(inv.batch_size)
        return empty.unsqueeze(0).expand(self.num_inference_steps, -1, -1, -1)

    def _step_offsets(self, inv: Inversion, rows: torch.Tensor, guidance: torch.Tensor) -> Callable[[int], torch.Tensor] | None:
        return None

    # -- inversion -----------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, images: torch.Tensor, source_prompts: Sequence[str]) -> Inversion:
        """images (B, 1, H, W) in [0, 1] -> Inversion; cached per item, misses inverted as one batch."""
        self.check_request(images, source_prompts, source_prompts)
        start_time, start_calls = time.perf_counter(), self.ld.unet_calls
        settings = self.inversion_settings()
        keys = [inversion_key(images[i], p, self.checkpoint, settings) for i, p in enumerate(source_prompts)]
        items: list[dict[str, torch.Tensor] | None] = [self.cache.get(k) for k in keys]
        missing = [i for i, item in enumerate(items) if item is None]
        if missing:
            fresh = self._invert_batch(images[missing], [source_prompts[i] for i in missing])
            for j, i in enumerate(missing):
                item = {n: t.select(_BATCH_DIM[n], j) for n, t in fresh.items()}
                self.cache.put(keys[i], item, {"prompt": source_prompts[i], "checkpoint": self.checkpoint, **settings})
                items[i] = item
        stacked = {
            n: torch.stack([item[n] for item in items], dim=_BATCH_DIM[n]).to(self.ld.device) for n in items[0]
        }
        return Inversion(
            source_prompts=list(source_prompts),
            unet_calls=self.ld.unet_calls - start_calls,
            seconds=time.perf_counter() - start_time,
            cache_hits=len(keys) - len(missing),
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
        latents = self.ld.encode_images(resize_images(images.float(), (size, size)))
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
        (B, 1, H, W) in {0, 1} keep the latent outside the mask on the pivot at every step.
        """
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
            z0 = guided_ddim_loop(self.ld, z_start, cond_target, uncond, guidance, start, offsets, keep)
        else:
            z0 = self._edit_with_attention_control(
                inversion, target_prompts, rows, z_start, cond_target, uncond, guidance, start, offsets, keep
            )
        images = self.ld.decode_latents(z0).float()
        if output_size is not None:
            images = resize_images(images, tuple(output_size))
        return images.reshape(b, g, *images.shape[1:])

    def _keep_outside(self, inv: Inversion, rows: torch.Tensor, masks: torch.Tensor):
        if masks.ndim != 4 or masks.shape[0] != inv.batch_size or masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, H, W) in {{0, 1}} with B = {inv.batch_size}, got {tuple(masks.shape)}")
        latent_mask = F.interpolate(masks.float(), size=inv.trajectory.shape[-2:], mode="area").to(self.ld.device)
        latent_mask = (latent_mask > 0).to(self.ld.dtype)[rows]
        T = self.num_inference_steps

        def keep(i: int, z: torch.Tensor) -> torch.Tensor:
            pivot = inv.trajectory[T - i - 1][rows].to(z.dtype)
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
        self.check_request(images, source_prompts, target_prompts)
        start_time, start_calls = time.perf_counter(), self.ld.unet_calls
        inversion = self.invert(images, source_prompts)
        cf = self.edit(inversion, target_prompts, masks=masks, output_size=tuple(images.shape[-2:]))[:, 0]
        b = images.shape[0]
        calls = self.ld.unet_calls - start_calls
        seconds = time.perf_counter() - start_time
        details = [
            {
                **self.settings(),
                "seed": seed,  # DDIM eta = 0 is deterministic; recorded for the run log
                "unet_calls": calls / b,
                "seconds": seconds / b,
                "inversion_cache_hits_in_batch": inversion.cache_hits,
            }
            for _ in range(b)
        ]
        extras = {}
        if inversion.null_loss is not None:
            extras["null_text_loss"] = inversion.null_loss.transpose(0, 1).float().cpu()  # (B, T)
        return CounterfactualOutput(images=cf.cpu().float(), details=details, extras=extras)


class NullTextInversionMaker(InvertThenEditMaker):
    """NTI counterfactuals: per-step null embeddings fitted to the pivot, edited prompt at sampling.

    null_setting: "default" (10, 1e-5) | "underfit" (8, 5e-4) | (inner_steps, early_stop_eps).
    inversion_guidance: the w the null embeddings are fitted for (default: guidance_scale); the
    search reuses one fit for several sampling guidances.
    """

    name = "nti"

    def __init__(
        self,
        pipe_or_latent_diffusion,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        null_setting: str | Sequence = "default",
        *,
        inversion_guidance: float | None = None,
        learning_rate: float = 1e-2,
        checkpoint: str = "default",
        cache: InversionCache | None = None,
        attention_control: AttentionControlConfig | None = None,
    ) -> None:
        super().__init__(
            pipe_or_latent_diffusion, num_inference_steps, guidance_scale, strength,
            checkpoint=checkpoint, cache=cache, attention_control=attention_control,
        )
        self.null_setting_label, self.inner_steps, self.early_stop_eps = resolve_null_setting(null_setting)
        self.null_setting = null_setting if isinstance(null_setting, str) else (self.inner_steps, self.early_stop_eps)
        self.inversion_guidance = float(guidance_scale if inversion_guidance is None else inversion_guidance)
        self.learning_rate = float(learning_rate)

    def with_null_setting(self, null_setting: str | Sequence) -> InvertThenEditMaker:
        """A sibling maker sharing the model, cache and other settings (the search's H_null loop).

        "negative-prompt" / "direct" give the optimisation-free makers of `fast_inversion.py`: same
        pivot trajectory (shared through the cache), no per-step fitting.
        """
        if isinstance(null_setting, str) and null_setting in FAST_NULL_SETTINGS:
            from cyclex.counterfactuals.fast_inversion import (
                DirectInversionMaker,
                NegativePromptInversionMaker,
            )

            cls = NegativePromptInversionMaker if null_setting == "negative-prompt" else DirectInversionMaker
            return cls(self.ld, self.num_inference_steps, self.guidance_scale, self.strength,
                       checkpoint=self.checkpoint, cache=self.cache, attention_control=self.attention_control)
        return NullTextInversionMaker(
            self.ld, self.num_inference_steps, self.guidance_scale, self.strength, null_setting,
            inversion_guidance=self.inversion_guidance, learning_rate=self.learning_rate,
            checkpoint=self.checkpoint, cache=self.cache, attention_control=self.attention_control,
        )

    def inversion_settings(self) -> dict[str, Any]:
        return {
            **super().inversion_settings(),
            "null_setting": self.null_setting_label,
            "inner_steps": self.inner_steps,
            "early_stop_eps": self.early_stop_eps,
            "inversion_guidance": self.inversion_guidance,
            "learning_rate": self.learning_rate,
        }

    def _fit(self, trajectory: torch.Tensor, cond_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        nulls, losses = null_text_optimisation(
            self.ld, trajectory, cond_embeds, guidance=self.inversion_guidance, inner_steps=self.inner_steps,
            early_stop_eps=self.early_stop_eps, learning_rate=self.learning_rate,
        )
        return {"null_embeds": nulls, "null_loss": losses}

    def _uncond_steps(self, inv: Inversion) -> torch.Tensor:
        if inv.null_embeds is None:
            raise ValueError("this inversion has no null-text embeddings (made by another maker?)")
        return inv.null_embeds


def null_text_optimisation(
    ld: LatentDiffusion,
    trajectory: torch.Tensor,
    cond_embeds: torch.Tensor,
    guidance: float = 7.5,
    inner_steps: int = 10,
    early_stop_eps: float = 1e-5,
    learning_rate: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mokady et al.'s null-text optimisation (their `null_optimization`), batched over items.

    trajectory (T + 1, B, C, h, w) pivot z*_0..z*_T; cond_embeds (B, L, D).
    Returns (null_embeds (T, B, L, D) float32, final loss per step (T, B)). Items are independent:
    Adam is element-wise and the loss is a sum of per-item MSEs, so batching does not mix them;
    the batch stops early when every item's loss is below the bound.
    """
    if ld.dtype != torch.float32:
        logger.warning("null-text inversion runs best in float32; the UNet is %s", ld.dtype)
    T = ld.num_inference_steps
    b = cond_embeds.shape[0]
    cond = cond_embeds.to(ld.device, ld.dtype)
    null = ld.empty_prompt_embeds(b).to(ld.device, torch.float32).clone()
    z_cur = trajectory[T].to(ld.device, ld.dtype)
    ld.scheduler.set_timesteps(T)
    nulls, losses = [], []
    for i in range(T):
        t = ld.scheduler.timesteps[i]
        z_target = trajectory[T - i - 1].to(ld.device, torch.float32)
        with torch.no_grad():
            eps_c = _unet_single(ld, z_cur, t, cond).float()
        null = null.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=learning_rate * (1.0 - i / 100.0))
        bound = early_stop_eps + i * EARLY_STOP_GROWTH
        per_item = torch.zeros(b)
        with torch.enable_grad():
            for _ in range(inner_steps):
                eps_u = _unet_single(ld, z_cur, t, null).float()
                eps = eps_u + guidance * (eps_c - eps_u)
                z_prev = ld.scheduler.step(eps, t, z_cur.float(), eta=0.0).prev_sample
                per_item = (z_prev - z_target).pow(2).flatten(1).mean(1)
                (grad,) = torch.autograd.grad(per_item.sum(), [null])
                null.grad = grad
                optimizer.step()
                if per_item.max().item() < bound:
                    break
        null = null.detach()
        nulls.append(null.clone())
        losses.append(per_item.detach().float().cpu())
        with torch.no_grad():  # eps_c at z_cur is already known: one UNet call for the step
            eps_u = _unet_single(ld, z_cur, t, null).float()
            eps = eps_u + guidance * (eps_c - eps_u)
            z_cur = ld.scheduler.step(eps.to(ld.dtype), t, z_cur, eta=0.0).prev_sample
    return torch.stack(nulls), torch.stack(losses)
