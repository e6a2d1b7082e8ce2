"""The one interface every counterfactual variant implements (plain DDIM, NTI, RSE, causal HVAE).

Like pytorch-grad-cam's CAM classes, every maker is constructed once with its models and settings
and then called the same way; the cyclic engine never branches on which maker it holds.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cyclex.image_checks import check_image_batch


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
    should invert it once (see `InvertThenEditMaker`'s inversion cache).

    `masks` (B, 1, H, W) in {0, 1} mean the same in every maker: the edit is confined to the mask.
    Diffusion makers keep the latent outside the mask on the query's inversion at every step and paste
    the query's pixels back outside it (`paste_query_outside_mask`); other makers must at least leave
    the query's pixels unchanged outside the mask.

    Optional hooks are declared here as documented no-ops; the engine and the run folder call them on
    every maker: `set_checkpoint_id`, `bind_cycle`, `start_run`, `merge_ranks`, `finish_run`.
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

    # -- hooks the engine and the run folder call on every maker (no-ops here) ------------------------
    def set_checkpoint_id(self, checkpoint_id: str) -> None:
        """Names the weights the maker runs on (`tailored_dir::checkpoint`), for cache keys and settings.

        `CyclicExplainer.from_pretrained` calls it once the checkpoint is loaded: a pipeline's path names
        the folder, not which UNet was loaded. Makers that cache per weights override it.
        """
        return None  # a declared no-op hook (not abstract): most makers have nothing to do here

    def bind_cycle(self, generator, labeler, uncertain_as_present: bool = True) -> None:
        """Hands the engine's generator and labeler to makers that verify candidates themselves (the
        search regenerates and relabels its candidates); `CyclicExplainer.__init__` calls it."""
        return None

    def start_run(self, run_dir: str | Path, rank: int | None = None) -> None:
        """Called before the first batch with the run folder the maker may log into; rank: this process's
        rank in a distributed run, which then logs into files of its own (`merge_ranks` folds them)."""
        return None

    def merge_ranks(self, run_dir: str | Path) -> None:
        """Called on rank 0 of a distributed run once every rank finished, before `finish_run`: fold what
        the ranks logged (`start_run(run_dir, rank)`) into the run folder's own files."""
        return None

    def finish_run(self, run_dir: str | Path) -> Path | None:
        """Called by `run_explainer` after the last batch (write run-level summaries); returns what it wrote."""
        return None

    @staticmethod
    def check_request(images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str]) -> None:
        check_image_batch(images)
        if len(source_prompts) != images.shape[0] or len(target_prompts) != images.shape[0]:
            raise ValueError(
                f"need one source and one target prompt per image: {images.shape[0]} images, "
                f"{len(source_prompts)} source prompts, {len(target_prompts)} target prompts"
            )

    @staticmethod
    def check_masks(masks: torch.Tensor, batch_size: int, size: tuple[int, int] | None = None) -> None:
        """masks must be (B, 1, H, W) (H, W = the images' when `size` is given)."""
        ok = (isinstance(masks, torch.Tensor) and masks.ndim == 4 and masks.shape[0] == batch_size
              and masks.shape[1] == 1 and (size is None or tuple(masks.shape[-2:]) == tuple(size)))
        if not ok:
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            expected = f"(B={batch_size}, 1, {size[0]}, {size[1]})" if size else f"(B={batch_size}, 1, H, W)"
            raise ValueError(f"masks must be {expected} in {{0, 1}}, got {shape}")
