"""The one interface every counterfactual variant implements (plain DDIM, NTI, RSE, causal HVAE).

Like pytorch-grad-cam's CAM classes, every maker is constructed once with its models and settings
and then called the same way; the cyclic engine never branches on which maker it holds.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CounterfactualOutput:
    """What a maker returns for a batch of B requests.

    images:  (B, 1, H, W) float32 in [0, 1], same H, W as the queries.
    details: one dict per request saying what the maker did (settings, UNet calls, seconds, ...);
             written verbatim into the run folder's results, so keep values JSON-serialisable.
    extras:  optional named tensors (B, ...) a variant produces besides the image, e.g. the RSE
             guidance map or the NTI per-step null embeddings' reconstruction error.
    """

    images: torch.Tensor
    details: list[dict[str, Any]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class CounterfactualMaker(abc.ABC):
    """Makes counterfactual X-rays: same patient, prompt edited (a finding removed).

    Requests come batched: item i asks to turn `images[i]`, described by `source_prompts[i]`, into
    the image described by `target_prompts[i]`. The engine batches the findings of one image and the
    images of one batch together, so the same (image, source prompt) pair often repeats; makers
    should invert it once (see the DDIM maker's inversion cache).
    """

    name: str = "base"
    # True: every request is served with the same settings, so redrawing a query with its own (source)
    # prompt shows what this maker cannot reproduce (`reconstruct`, the engine's "reconstruction" reference).
    reconstructs_with_fixed_settings: bool = True

    @abc.abstractmethod
    def make(
        self,
        images: torch.Tensor,
        source_prompts: Sequence[str],
        target_prompts: Sequence[str],
        *,
        masks: torch.Tensor | None = None,
        seed: int = 0,
    ) -> CounterfactualOutput:
        """images (B, 1, H, W) in [0, 1]; masks optional (B, 1, H, W) in {0, 1} limiting the edit."""

    def reconstruct(self, images: torch.Tensor, source_prompts: Sequence[str], *, seed: int = 0) -> torch.Tensor:
        """The queries as this maker redraws them with their own (source) prompts, same settings and seed.

        images (B, 1, H, W) in [0, 1] -> (B, 1, H, W) in [0, 1]. Default: `make` with target = source.
        Differencing a counterfactual against this instead of the query keeps what the prompt edit
        changed and drops what the autoencoder / sampler cannot reproduce (texture, noise).
        """
        return self.make(images, source_prompts, source_prompts, seed=seed).images

    def settings(self) -> dict[str, Any]:
        """The maker's settings, recorded in every result line (JSON-serialisable)."""
        return {"variant": self.name}

    @staticmethod
    def check_request(images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str]) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 1, H, W) tensor in [0, 1], got {shape}")
        if len(source_prompts) != images.shape[0] or len(target_prompts) != images.shape[0]:
            raise ValueError(
                f"need one source and one target prompt per image: {images.shape[0]} images, "
                f"{len(source_prompts)} source prompts, {len(target_prompts)} target prompts"
            )
