"""Phantoms with attributes as training tensors for the causal HVAE: images (N, 1, S, S) in [0, 1], parents (N, P)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cyclex.causal.parents import ParentSchema
from cyclex.datasets.phantom import Phantom, PhantomConfig, make_phantom, phantom_seed, to_uint8


def causal_phantom_config(size: int = 64) -> PhantomConfig:
    """The phantom world the causal models learn: attributes on, otherwise the defaults."""
    return PhantomConfig(size=size, attributes=True)


def phantom_parents(phantom: Phantom, schema: ParentSchema) -> torch.Tensor:
    if phantom.attributes is None:
        raise ValueError(f"phantom {phantom.id} has no attributes: make it with PhantomConfig(attributes=True)")
    present = [f for f in phantom.findings_meta if f in schema.findings]
    return schema.vector(phantom.attributes["age"], phantom.attributes["sex"], present)


def phantom_tensors(phantoms: Sequence[Phantom], schema: ParentSchema) -> tuple[torch.Tensor, torch.Tensor]:
    """Images quantised to 8 bit (as written to disk and seen in the cycle) and their parents."""
    images = np.stack([to_uint8(p.image) for p in phantoms]).astype(np.float32) / 255.0
    return torch.from_numpy(images)[:, None], torch.stack([phantom_parents(p, schema) for p in phantoms])


def causal_phantoms(n: int, set_seed: int, size: int = 64) -> list[Phantom]:
    """n attribute phantoms of the set `set_seed` (seeds phantom_seed(set_seed, i))."""
    config = causal_phantom_config(size)
    return [make_phantom(phantom_seed(set_seed, i), config, phantom_id=f"causal-{phantom_seed(set_seed, i):09d}")
            for i in range(n)]
