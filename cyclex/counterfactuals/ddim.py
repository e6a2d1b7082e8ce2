"""Plain DDIM counterfactuals, the CVLM maker (seed 003, SPEC section 1).

For each request: DDIM (eta = 0) inversion of the query latent with its source prompt (T steps,
guidance 1), then DDIM sampling from the inverted latent with the edited prompt under
classifier-free guidance omega. Denoising strength delta (seed 000) picks where sampling starts on
the same trajectory: delta = 1 starts from z_T, delta < 1 from z_k with k = T - round((1 - delta) T).

This is the base behaviour of `InvertThenEditMaker` (`inversion.py`), unchanged: the findings of
one image share one cached inversion and all requests of one `make` call go through the UNet
together (one inversion batch for the new keys, one sampling batch).
"""

from __future__ import annotations

from cyclex.counterfactuals.inversion import InvertThenEditMaker


class DDIMCounterfactualMaker(InvertThenEditMaker):
    """CVLM counterfactuals: DDIM-invert with the source prompt, resample with the target prompt.

    Every hook of `InvertThenEditMaker` at its default (its arguments: pipe, num_inference_steps = 50,
    guidance_scale = 7.5, strength = 1.0, ...); a smaller inversion cache (64 entries).
    """

    name = "ddim"
    default_cache_size = 64
