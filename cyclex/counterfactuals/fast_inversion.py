"""Optimisation-free alternatives to null-text inversion, behind the same maker interface.

- `NegativePromptInversionMaker` (Miyake et al. 2023, "Negative-prompt inversion"): NTI's optimised
  null embedding is approximately the source prompt's embedding, so sample with
  uncond = c_source at every step. Cost: the guidance-1 inversion only (T UNet calls), no fitting.
- `DirectInversionMaker` (Ju et al. 2024, "PnP inversion" / direct inversion): keep the plain
  empty-prompt guidance and, at every step i, add back the offset between the pivot and the guided
  reconstruction step taken from the pivot,
      d_i(w) = z*_{T-i-1} - DDIM(z*_{T-i}, eps_u + w (eps_c - eps_u), t_i),
  so the source branch follows the pivot exactly. eps_u and eps_c at the pivot are stored once
  (2T UNet calls), which gives d_i(w) for any guidance w without more UNet calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cyclex.counterfactuals.inversion import Inversion, InvertThenEditMaker

# Optimisation-free choices of the unconditional branch, usable wherever a null-text setting is
# (the search's H_null): negative-prompt inversion (null := source prompt) and direct inversion.
FAST_NULL_SETTINGS: tuple[str, ...] = ("negative-prompt", "direct")


class NegativePromptInversionMaker(InvertThenEditMaker):
    """Null embedding := source prompt embedding (Miyake et al.); no optimisation."""

    name = "negative-prompt"

    def _uncond_steps(self, inv: Inversion) -> torch.Tensor:
        return inv.cond_embeds.unsqueeze(0).expand(self.num_inference_steps, -1, -1, -1)


class DirectInversionMaker(InvertThenEditMaker):
    """Direct (PnP) inversion: per-step offsets to the pivot added back while editing (Ju et al.)."""

    name = "direct"

    def inversion_settings(self) -> dict[str, Any]:
        return {**super().inversion_settings(), "pivot_eps": "empty-prompt"}

    def _fit(self, trajectory: torch.Tensor, cond_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        ld = self.ld
        T = self.num_inference_steps
        b = cond_embeds.shape[0]
        empty = ld.empty_prompt_embeds(b)
        ld.scheduler.set_timesteps(T)
        eps = []
        for i in range(T):
            eps_u, eps_c = ld.eps_pair(trajectory[T - i], ld.scheduler.timesteps[i], empty, cond_embeds)
            eps.append(torch.stack([eps_u, eps_c], dim=1))  # (B, 2, C, h, w)
        return {"pivot_eps": torch.stack(eps)}  # (T, B, 2, C, h, w)

    def _step_offsets(
        self, inv: Inversion, rows: torch.Tensor, guidance: torch.Tensor
    ) -> Callable[[int], torch.Tensor]:
        if inv.pivot_eps is None:
            raise ValueError("this inversion has no pivot noise predictions (made by another maker?)")
        ld = self.ld
        T = self.num_inference_steps
        w = guidance.to(ld.device, torch.float32).view(-1, 1, 1, 1)

        def offset(i: int) -> torch.Tensor:
            t = ld.scheduler.timesteps[i]
            eps_u, eps_c = inv.pivot_eps[i][rows].float().unbind(dim=1)
            pivot = inv.trajectory[T - i][rows]
            guided = (eps_u + w * (eps_c - eps_u)).to(ld.dtype)
            step = ld.scheduler.step(guided, t, pivot, eta=0.0).prev_sample
            return inv.trajectory[T - i - 1][rows] - step

        return offset
