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

Only phi gets gradients (`torch.autograd.grad` on phi alone, under a local `torch.enable_grad()`).
phi, its Adam state, the latents and the DDIM updates stay in float32 whatever the UNet's dtype, so
the UNet may run in half precision (fp16 / bf16: half the UNet cost on a GPU) while the
optimisation itself never does (in half precision throughout, NTI diverges).

The inversion cache, the sampling loop, strengths, guidance batches, prompt-to-prompt control and
masked editing are `InvertThenEditMaker`'s (`inversion.py`, plain DDIM); NTI overrides two hooks:
`_fit` (the null-text optimisation) and `_uncond_steps` (the fitted embeddings).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from cyclex.counterfactuals.attention_control import AttentionControlConfig
from cyclex.counterfactuals.diffusion import LatentDiffusion
from cyclex.counterfactuals.fast_inversion import (
    FAST_NULL_SETTINGS,
    DirectInversionMaker,
    NegativePromptInversionMaker,
)
from cyclex.counterfactuals.inversion import Inversion, InvertThenEditMaker
from cyclex.counterfactuals.inversion_cache import InversionCache

logger = logging.getLogger(__name__)

# H_null = (inner iterations, early-stop error); SPEC section 2 (the paper prints them transposed).
NULL_SETTINGS: dict[str, tuple[int, float]] = {"default": (10, 1e-5), "underfit": (8, 5e-4)}
# Reference code: the early-stop bound loosens by 2e-5 per step.
EARLY_STOP_GROWTH = 2e-5

__all__ = ["EARLY_STOP_GROWTH", "FAST_NULL_SETTINGS", "NULL_SETTINGS", "NullTextInversionMaker",
           "null_text_optimisation", "resolve_null_setting"]


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
        **settings,
    ) -> None:
        super().__init__(
            pipe_or_latent_diffusion, num_inference_steps, guidance_scale, strength,
            checkpoint=checkpoint, cache=cache, attention_control=attention_control, **settings,
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
            cls = NegativePromptInversionMaker if null_setting == "negative-prompt" else DirectInversionMaker
            return cls(self.ld, self.num_inference_steps, self.guidance_scale, self.strength,
                       checkpoint=self.checkpoint, cache=self.cache, attention_control=self.attention_control,
                       paste_query_outside_mask=self.paste_query_outside_mask)
        return NullTextInversionMaker(
            self.ld, self.num_inference_steps, self.guidance_scale, self.strength, null_setting,
            inversion_guidance=self.inversion_guidance, learning_rate=self.learning_rate,
            checkpoint=self.checkpoint, cache=self.cache, attention_control=self.attention_control,
            paste_query_outside_mask=self.paste_query_outside_mask,
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
        logger.debug("null-text inversion: UNet in %s, the null embedding and latents in float32", ld.dtype)
    T = ld.num_inference_steps
    b = cond_embeds.shape[0]
    cond = cond_embeds.to(ld.device, ld.dtype)
    null = ld.empty_prompt_embeds(b).to(ld.device, torch.float32).clone()
    z_cur = trajectory[T].to(ld.device, torch.float32)  # the UNet casts its input; the update stays fp32
    ld.scheduler.set_timesteps(T)
    nulls, losses = [], []
    for i in range(T):
        t = ld.scheduler.timesteps[i]
        z_target = trajectory[T - i - 1].to(ld.device, torch.float32)
        with torch.no_grad():
            eps_c = ld.eps_single(z_cur, t, cond).float()
        null = null.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=learning_rate * (1.0 - i / 100.0))
        bound = early_stop_eps + i * EARLY_STOP_GROWTH
        per_item = torch.zeros(b)
        with torch.enable_grad():
            for _ in range(inner_steps):
                eps_u = ld.eps_single(z_cur, t, null).float()
                eps = eps_u + guidance * (eps_c - eps_u)
                z_prev = ld.scheduler.step(eps, t, z_cur, eta=0.0).prev_sample
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
            eps_u = ld.eps_single(z_cur, t, null).float()
            eps = eps_u + guidance * (eps_c - eps_u)
            z_cur = ld.scheduler.step(eps, t, z_cur, eta=0.0).prev_sample
    return torch.stack(nulls), torch.stack(losses)
