"""Prompt-to-prompt cross-attention control (Hertz et al. 2022) as diffusers attention processors.

PRISM (seed 002) edits with null-text inversion + prompt-to-prompt: the source prompt and the edited
prompt are denoised side by side in one UNet batch, and the edited branch borrows the source
branch's attention maps, so the geometry of the X-ray stays while the removed finding fades.

- **refine** (P2P "AttentionRefine"): target tokens aligned to a source token (word-level alignment
  of the two token sequences, `difflib`) take the source's cross-attention column; new tokens keep
  their own. Removing a finding = dropping its tokens, so refine is the natural removal edit.
- **replace** (P2P "AttentionReplace", word swap): prompts with the same token count; the target
  takes the source's whole cross-attention map.
- **reweight** (P2P "AttentionReweight"): scale the target's attention on chosen tokens (e.g. the
  removed finding's tokens to 0 when the target prompt equals the source prompt).
- **self-attention replace** for the first steps keeps the anatomy.
- **local blend**: the mask of the removed finding's tokens in the source branch's cross-attention
  (averaged over layers, heads and the steps so far, dilated, normalised, thresholded) limits the
  edit: outside it the target latent is reset to the source latent at every step.

The processors subclass diffusers' `AttnProcessor` and are installed with `unet.set_attn_processor`
inside the `prompt_to_prompt(unet, controller)` context manager, which restores the original
processors on exit (also on error). No monkeypatching.

Batch layout the controller expects (N = number of edits): the UNet batch is
`[uncond(source N), uncond(target N), cond(source N), cond(target N)]` (4N rows, classifier-free
guidance) or `[source N, target N]` (2N rows, no guidance); only the conditional half is edited,
as in the P2P reference code.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor

logger = logging.getLogger(__name__)

EDIT_MODES = ("refine", "replace", "reweight")


@dataclass
class AttentionControlConfig:
    """Settings of the prompt-to-prompt edit (defaults from the P2P / NTI notebooks)."""

    mode: str = "refine"  # refine | replace | reweight
    cross_replace_fraction: float = 0.8  # share of the steps where cross-attention is borrowed
    self_replace_fraction: float = 0.4  # share of the steps where self-attention is borrowed
    max_self_replace_pixels: int = 32**2  # P2P only swaps self-attention at low resolutions
    local_blend: bool = True
    blend_threshold: float = 0.3  # P2P LocalBlend threshold on the normalised map
    blend_start_fraction: float = 0.2  # P2P starts blending after a few steps (maps settle)
    removed_token_weight: float = 0.0  # reweight mode: factor on the removed finding's tokens

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise ValueError(f"AttentionControlConfig.mode must be one of {EDIT_MODES}, got {self.mode!r}")
        for name in ("cross_replace_fraction", "self_replace_fraction", "blend_threshold", "blend_start_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AttentionControlConfig.{name} must be in [0, 1], got {value}")


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the text encoder sees them (BOS ... EOS, no padding)."""
    return [list(tokenizer(p, truncation=True, max_length=tokenizer.model_max_length).input_ids) for p in prompts]


def align_tokens(source_ids: Sequence[int], target_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Word-level alignment of two token sequences (P2P `get_refinement_mapper`, via difflib).

    Returns (mapper, removed): mapper[j] = index of the source token that target token j copies, or
    -1 for a token new in the target; removed = source positions with no target counterpart (the
    dropped finding's tokens).
    """
    matcher = difflib.SequenceMatcher(a=list(source_ids), b=list(target_ids), autojunk=False)
    mapper = [-1] * len(target_ids)
    matched_source = set()
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            mapper[block.b + k] = block.a + k
            matched_source.add(block.a + k)
    removed = [i for i in range(len(source_ids)) if i not in matched_source]
    return mapper, removed


class PromptToPromptController:
    """State shared by all processors during one edited sampling run.

    token_mapper: (N, L) long, target position -> source position (-1: keep the target's own);
    padding positions map to themselves, as P2P does. removed_tokens: (N, L) bool, source positions
    of the removed finding (drives local blend and reweight). num_steps: T of the sampling run.
    """

    def __init__(
        self,
        token_mapper: torch.Tensor,
        removed_tokens: torch.Tensor,
        num_steps: int,
        config: AttentionControlConfig | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> None:
        if token_mapper.ndim != 2 or removed_tokens.shape != token_mapper.shape:
            raise ValueError(
                f"token_mapper and removed_tokens must both be (N, L); got {tuple(token_mapper.shape)} "
                f"and {tuple(removed_tokens.shape)}"
            )
        self.config = config or AttentionControlConfig()
        self.token_mapper = token_mapper.long()
        self.removed_tokens = removed_tokens.bool()
        self.num_edits = token_mapper.shape[0]
        self.num_steps = int(num_steps)
        self.latent_size = latent_size
        self.step_index = 0
        self.edited_calls = 0  # attention calls where the edit was applied (tests, logs)
        self._blend_sum: torch.Tensor | None = None  # (N, 1, h, w) accumulated removed-token maps
        self._blend_count = 0

    @classmethod
    def from_prompts(
        cls, tokenizer, source_prompts: Sequence[str], target_prompts: Sequence[str], num_steps: int,
        config: AttentionControlConfig | None = None, latent_size: tuple[int, int] | None = None,
    ) -> PromptToPromptController:
        """Build the token alignment of each (source, target) pair from the tokenizer."""
        config = config or AttentionControlConfig()
        if len(source_prompts) != len(target_prompts):
            raise ValueError(f"{len(source_prompts)} source prompts for {len(target_prompts)} target prompts")
        length = int(tokenizer.model_max_length)
        mappers, removed_masks = [], []
        for src, tgt in zip(prompt_token_ids(tokenizer, source_prompts), prompt_token_ids(tokenizer, target_prompts), strict=True):
            mapper, removed = align_tokens(src, tgt)
            if config.mode == "replace":
                if len(src) != len(tgt):
                    raise ValueError(
                        f"replace (word swap) needs prompts with the same token count, got {len(src)} and "
                        f"{len(tgt)}; use mode='refine' for removals"
                    )
                removed = [i for i, (a, b) in enumerate(zip(src, tgt, strict=True)) if a != b]
                mapper = list(range(len(tgt)))
            full = torch.arange(length)  # padding positions map to themselves
            full[: len(mapper)] = torch.tensor(mapper, dtype=torch.long)
            mappers.append(full)
            mask = torch.zeros(length, dtype=torch.bool)
            mask[removed] = True
            removed_masks.append(mask)
        return cls(torch.stack(mappers), torch.stack(removed_masks), num_steps, config, latent_size)

    # -- sampler hooks -------------------------------------------------------------------------
    def begin_step(self, step_index: int) -> None:
        self.step_index = int(step_index)

    def _in_window(self, fraction: float) -> bool:
        return self.step_index < int(round(fraction * self.num_steps))

    def blend_mask(self) -> torch.Tensor | None:
        """(N, 1, h, w) in {0, 1}: where the removed finding's tokens drew the source's attention."""
        if self._blend_sum is None or self._blend_count == 0:
            return None
        maps = self._blend_sum / self._blend_count
        maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)  # P2P dilates by a 3x3 max-pool
        peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (maps / peak > self.config.blend_threshold).to(maps.dtype)

    def local_blend(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (2N, C, h, w) = [source; target] -> target rows reset to source outside the mask."""
        if not self.config.local_blend or self.step_index < int(round(self.config.blend_start_fraction * self.num_steps)):
            return latents
        mask = self.blend_mask()
        if mask is None:
            return latents
        n = self.num_edits
        mask = F.interpolate(mask, size=latents.shape[-2:], mode="nearest").to(latents.dtype)
        source, target = latents[:n], latents[n:]
        return torch.cat([source, source + mask * (target - source)])

    # -- processor hook ------------------------------------------------------------------------
    def edit_attention(self, probs: torch.Tensor, heads: int, is_cross: bool) -> torch.Tensor:
        """probs (rows * heads, Q, K) -> edited probs, same shape (see module doc for the rows)."""
        rows = probs.shape[0] // heads
        n = self.num_edits
        if rows == 4 * n:
            start = 2 * n  # conditional half only
        elif rows == 2 * n:
            start = 0
        else:
            return probs
        probs = probs.reshape(rows, heads, *probs.shape[1:])
        cond = probs[start:start + 2 * n]
        source, target = cond[:n], cond[n:]
        if is_cross:
            self._record_blend_maps(source)
            if self._in_window(self.config.cross_replace_fraction):
                target = self._edit_cross(source, target)
            elif self.config.mode == "reweight":
                target = self._reweight(target)
        elif self._in_window(self.config.self_replace_fraction) and probs.shape[2] <= self.config.max_self_replace_pixels:
            target = source.clone()
        else:
            return probs.reshape(rows * heads, *probs.shape[2:])
        self.edited_calls += 1
        edited = torch.cat([probs[:start], source, target, probs[start + 2 * n:]])
        return edited.reshape(rows * heads, *probs.shape[2:])

    def _edit_cross(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """source, target: (N, heads, Q, L)."""
        if self.config.mode == "reweight":
            return self._reweight(target)
        mapper = self.token_mapper.to(source.device)[:, : target.shape[-1]]
        keep_own = (mapper < 0)[:, None, None, :]
        index = mapper.clamp_min(0)[:, None, None, :].expand_as(target)
        borrowed = torch.gather(source, -1, index)
        return torch.where(keep_own, target, borrowed)

    def _reweight(self, target: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(target.shape[0], target.shape[-1], device=target.device, dtype=target.dtype)
        removed = self.removed_tokens.to(target.device)[:, : target.shape[-1]]
        weights = torch.where(removed, torch.full_like(weights, self.config.removed_token_weight), weights)
        return target * weights[:, None, None, :]

    def _record_blend_maps(self, source: torch.Tensor) -> None:
        """Accumulate the source branch's attention on the removed tokens, resized to one grid."""
        removed = self.removed_tokens.to(source.device)[:, : source.shape[-1]].to(source.dtype)
        per_pixel = (source * removed[:, None, None, :]).sum(-1).mean(1)  # (N, Q)
        q = per_pixel.shape[-1]
        if self.latent_size is not None:
            lh, lw = self.latent_size
            factor = math.sqrt(lh * lw / q)
            h, w = max(1, int(round(lh / factor))), max(1, int(round(lw / factor)))
            if h * w != q:
                return
        else:
            h = w = int(math.isqrt(q))
            if h * w != q:
                return
        grid = self.latent_size or (h, w)
        maps = F.interpolate(per_pixel.float().reshape(-1, 1, h, w), size=grid, mode="bilinear", align_corners=False)
        self._blend_sum = maps if self._blend_sum is None or self._blend_sum.shape != maps.shape else self._blend_sum + maps
        self._blend_count = 1 if self._blend_sum is maps else self._blend_count + 1


class PromptToPromptProcessor(AttnProcessor):
    """diffusers' default attention, computed with explicit probabilities so P2P can edit them."""

    def __init__(self, controller: PromptToPromptController, place: str) -> None:
        super().__init__()
        self.controller = controller
        self.place = place  # "down" | "mid" | "up" (logs only)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        attention_probs = self.controller.edit_attention(attention_probs, attn.heads, is_cross)
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _place(processor_name: str) -> str:
    for place in ("down", "mid", "up"):
        if processor_name.startswith(place):
            return place
    return "other"


@contextmanager
def prompt_to_prompt(unet, controller: PromptToPromptController) -> Iterator[PromptToPromptController]:
    """Install P2P processors on every attention layer of `unet`; restore the originals on exit."""
    original = dict(unet.attn_processors)
    processors = {name: PromptToPromptProcessor(controller, _place(name)) for name in original}
    unet.set_attn_processor(processors)
    try:
        yield controller
    finally:
        # set_attn_processor pops from the dict it is given: hand it a copy.
        unet.set_attn_processor(dict(original))
