"""A conditional hierarchical VAE as the image mechanism of a deep structural causal model (SPEC section 5).

After Ribeiro et al. 2023 (public code biomedia-mira/causal-gen), written small enough for a CPU:
- an encoder of residual blocks at several resolutions (`resolutions`, widest first) whose activations
  feed the posteriors;
- a top-down decoder of blocks at the same resolutions, smallest first; blocks at resolutions up to
  `z_max_res` are stochastic, with a conditional prior p(z_i | z_<i, pa) and a posterior
  q(z_i | z_<i, x, pa); the parents pa enter every block as broadcast maps;
- a discretised-Gaussian likelihood p(x | z, pa) with a per-pixel loc and scale.

The counterfactual (`counterfactual`) is Pearl's three steps:
1. abduction: posterior latents z given (x, pa) and the image noise u = (x - loc) / scale;
2. action: pa -> pa~;
3. prediction: decode with pa~, each latent mixed with its re-expression under the new prior
   z~_i = alpha z_i + (1 - alpha) (p~_loc + p~_scale (z_i - p_loc) / p_scale)  (alpha = `cf_alpha`,
   0.5; our reading of causal-gen's mixing), then x~ = loc~ + scale~ u.
With pa~ = pa every step is the identity (the new prior is the old one), so composition holds by
construction; `decode_mean` gives the decoder's own reconstruction without u for the harder test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cyclex.causal.likelihood import discretised_gaussian_log_likelihood, gaussian_kl
from cyclex.causal.module_folder import load_module_folder, save_module_folder
from cyclex.causal.parents import ParentSchema

CONFIG_NAME, WEIGHTS_NAME = "hvae_config.json", "hvae.safetensors"


@dataclass
class HVAEConfig:
    """Architecture of the conditional HVAE; defaults: the tiny 64 px phantom model (scripts/train_demo_causal.py)."""

    image_size: int = 64
    resolutions: tuple[int, ...] = (64, 32, 16, 8, 4, 1)  # widest first; the encoder goes down, the decoder up
    widths: tuple[int, ...] = (16, 32, 48, 64, 64, 64)  # channels at each resolution
    blocks: tuple[int, ...] = (1, 1, 1, 1, 1, 1)  # residual blocks at each resolution
    z_max_res: int = 16  # decoder blocks at resolutions <= this are stochastic (paper: half the input side)
    z_channels: int = 8  # channels of each latent z_i (paper: 16)
    bottleneck: int = 4  # residual blocks narrow their width by this factor
    parent_findings: tuple[str, ...] = ParentSchema().findings
    cf_alpha: float = 0.5  # latent mixing with the counterfactual prior (causal-gen's default)
    logscale_min: float = -6.0  # floor of the likelihood's log standard deviation
    extra: dict = field(default_factory=dict)  # free-form notes saved with the weights (data, seeds)

    def __post_init__(self) -> None:
        self.resolutions, self.widths, self.blocks = tuple(self.resolutions), tuple(self.widths), tuple(self.blocks)
        self.parent_findings = tuple(self.parent_findings)
        if not (len(self.resolutions) == len(self.widths) == len(self.blocks)):
            raise ValueError(f"HVAEConfig: resolutions {self.resolutions}, widths {self.widths} and blocks {self.blocks} "
                             "must have the same length")
        if self.resolutions[0] != self.image_size or list(self.resolutions) != sorted(self.resolutions, reverse=True):
            raise ValueError(f"HVAEConfig.resolutions must start at image_size {self.image_size} and decrease, "
                             f"got {self.resolutions}")
        if not any(r <= self.z_max_res for r in self.resolutions):
            raise ValueError(f"HVAEConfig.z_max_res {self.z_max_res} leaves no stochastic resolution in {self.resolutions}")
        if not 0.0 <= self.cf_alpha <= 1.0:
            raise ValueError(f"HVAEConfig.cf_alpha must be in [0, 1], got {self.cf_alpha}")

    @property
    def schema(self) -> ParentSchema:
        return ParentSchema(self.parent_findings)


class ResidualBlock(nn.Module):
    """Bottlenecked residual block (1x1, 3x3, 3x3, 1x1 convolutions with GELU), the VDVAE block shape."""

    def __init__(self, in_width: int, out_width: int, bottleneck: int, zero_last: bool = False) -> None:
        super().__init__()
        mid = max(4, in_width // bottleneck)
        self.net = nn.Sequential(
            nn.GELU(), nn.Conv2d(in_width, mid, 1), nn.GELU(), nn.Conv2d(mid, mid, 3, padding=1),
            nn.GELU(), nn.Conv2d(mid, mid, 3, padding=1), nn.GELU(), nn.Conv2d(mid, out_width, 1),
        )
        self.skip = in_width == out_width
        if zero_last:  # start as a no-op residual (stable deep hierarchies)
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return x + out if self.skip else out


def _parent_map(pa: torch.Tensor, size: int) -> torch.Tensor:
    return pa[:, :, None, None].expand(-1, -1, size, size)


class Encoder(nn.Module):
    """x (B, 1, S, S) in [-1, 1] -> {resolution: activation (B, width, r, r)}."""

    def __init__(self, config: HVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Conv2d(1, config.widths[0], 3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(w, w, config.bottleneck) for _ in range(n)])
            for w, n in zip(config.widths, config.blocks, strict=True))
        self.transitions = nn.ModuleList(
            nn.Conv2d(config.widths[i], config.widths[i + 1], 1) for i in range(len(config.widths) - 1))

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        h = self.stem(x)
        activations = {}
        for i, res in enumerate(self.config.resolutions):
            h = self.stages[i](h)
            activations[res] = h
            if i + 1 < len(self.config.resolutions):
                h = self.transitions[i](F.adaptive_avg_pool2d(h, self.config.resolutions[i + 1]))
        return activations


class DecoderBlock(nn.Module):
    """One top-down block: parents as maps, (stochastic) latent, then a residual block."""

    def __init__(self, width: int, n_parents: int, config: HVAEConfig, stochastic: bool) -> None:
        super().__init__()
        self.stochastic = stochastic
        self.z_channels = config.z_channels
        self.parents_in = nn.Conv2d(n_parents, width, 1)
        if stochastic:
            zc = config.z_channels
            # prior p(z | h, pa): loc, logscale and a residual for h; posterior q(z | h, x, pa): loc, logscale
            self.prior = ResidualBlock(width + n_parents, 2 * zc + width, config.bottleneck)
            self.posterior = ResidualBlock(2 * width + n_parents, 2 * zc, config.bottleneck)
            self.z_in = nn.Conv2d(zc, width, 1)
            # the prior starts at N(0, 1) and the residual at 0: the ELBO starts from a sane place
            nn.init.zeros_(self.prior.net[-1].weight)
            nn.init.zeros_(self.prior.net[-1].bias)
        self.res = ResidualBlock(width, width, config.bottleneck, zero_last=True)

    def prior_of(self, h: torch.Tensor, pa_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.prior(torch.cat([h, pa_map], 1))
        zc = self.z_channels
        return out[:, :zc], out[:, zc:2 * zc], out[:, 2 * zc:]

    def posterior_of(self, h: torch.Tensor, activation: torch.Tensor, pa_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.posterior(torch.cat([h, activation, pa_map], 1))
        return out[:, :self.z_channels], out[:, self.z_channels:]


@dataclass
class Abduction:
    """What abduction infers from (x, pa): the latents, their priors, and the image noise u."""

    latents: list[torch.Tensor]  # z_i, one per stochastic block, top-down order
    prior_locs: list[torch.Tensor]
    prior_logscales: list[torch.Tensor]
    loc: torch.Tensor  # (B, 1, S, S) decoder loc given (z, pa), on [-1, 1]
    logscale: torch.Tensor
    noise: torch.Tensor  # u = (x - loc) / scale


class CausalHVAE(nn.Module):
    """The conditional HVAE. Images enter and leave on [0, 1] (`counterfactual`) or [-1, 1] (internals)."""

    def __init__(self, config: HVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.n_parents = config.schema.size
        self.encoder = Encoder(config)
        self.top = nn.Parameter(torch.zeros(1, config.widths[-1], config.resolutions[-1], config.resolutions[-1]))
        ascending = list(zip(config.resolutions, config.widths, config.blocks, strict=True))[::-1]
        self.block_resolutions: list[int] = []
        blocks, widen = [], []
        previous_width = config.widths[-1]
        for res, width, count in ascending:
            widen.append(nn.Conv2d(previous_width, width, 1) if width != previous_width else nn.Identity())
            for _ in range(count):
                blocks.append(DecoderBlock(width, self.n_parents, config, stochastic=res <= config.z_max_res))
                self.block_resolutions.append(res)
            previous_width = width
        self.decoder_blocks = nn.ModuleList(blocks)
        self.widen = nn.ModuleList(widen)
        self.out = nn.Conv2d(config.widths[0], 2, 3, padding=1)

    # -- the top-down pass shared by the ELBO, abduction and prediction -----------------------------
    def _top_down(self, pa: torch.Tensor, *, activations: dict[int, torch.Tensor] | None = None,
                  latents: list[torch.Tensor] | None = None, abducted: Abduction | None = None,
                  alpha: float | None = None, sample: bool = True):
        """Run the decoder. activations: posterior mode (returns KLs); latents: given-latent mode, with
        `abducted` for the counterfactual mixing. Returns (loc, logscale, kls, z list, prior locs, logscales)."""
        batch = pa.shape[0]
        h = self.top.expand(batch, -1, -1, -1)
        kls, zs, p_locs, p_logscales = [], [], [], []
        block_index, stochastic_index, previous_res = 0, 0, self.config.resolutions[-1]
        ascending = list(zip(self.config.resolutions, self.config.blocks, strict=True))[::-1]
        for stage, (res, count) in enumerate(ascending):
            if res != previous_res:
                h = F.interpolate(h, size=(res, res), mode="nearest")
            h = self.widen[stage](h)
            previous_res = res
            pa_map = _parent_map(pa, res)
            for _ in range(count):
                block = self.decoder_blocks[block_index]
                block_index += 1
                h = h + block.parents_in(pa_map)
                if block.stochastic:
                    p_loc, p_logscale, h_residual = block.prior_of(h, pa_map)
                    if activations is not None:
                        q_loc, q_logscale = block.posterior_of(h, activations[res], pa_map)
                        z = q_loc + torch.exp(q_logscale) * torch.randn_like(q_loc) if sample else q_loc
                        kls.append(gaussian_kl(q_loc, q_logscale, p_loc, p_logscale))
                    else:
                        z = latents[stochastic_index]
                        if abducted is not None:
                            noise = (z - abducted.prior_locs[stochastic_index]) / torch.exp(abducted.prior_logscales[stochastic_index])
                            z = alpha * z + (1.0 - alpha) * (p_loc + torch.exp(p_logscale) * noise)
                    stochastic_index += 1
                    zs.append(z)
                    p_locs.append(p_loc)
                    p_logscales.append(p_logscale)
                    h = h + h_residual + block.z_in(z)
                h = block.res(h)
        out = self.out(h)
        loc = torch.tanh(out[:, :1])
        logscale = out[:, 1:].clamp(min=self.config.logscale_min, max=0.0)
        return loc, logscale, kls, zs, p_locs, p_logscales

    def check_inputs(self, x: torch.Tensor, pa: torch.Tensor, name: str = "x") -> None:
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"{name} must be (B, 1, {size}, {size}), got {tuple(x.shape)}")
        if pa.ndim != 2 or pa.shape != (x.shape[0], self.n_parents):
            raise ValueError(f"parents must be (B={x.shape[0]}, P={self.n_parents}) in the order "
                             f"{list(self.config.schema.names)}, got {tuple(pa.shape)}")

    # -- training objective ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, pa: torch.Tensor, beta: float = 1.0) -> dict[str, torch.Tensor]:
        """The ELBO (`elbo`): what accelerate's wrapped model computes in training."""
        return self.elbo(x, pa, beta)

    def elbo(self, x: torch.Tensor, pa: torch.Tensor, beta: float = 1.0) -> dict[str, torch.Tensor]:
        """Negative ELBO per dimension (nats/dim, lower is better) of x in [-1, 1]; also its parts."""
        self.check_inputs(x, pa)
        activations = self.encoder(x)
        loc, logscale, kls, _, _, _ = self._top_down(pa, activations=activations)
        dims = x[0].numel()
        log_likelihood = discretised_gaussian_log_likelihood(x, loc, logscale).flatten(1).sum(1) / dims
        kl = torch.stack([k.flatten(1).sum(1) for k in kls], 1).sum(1) / dims
        nelbo = (-log_likelihood + beta * kl).mean()
        return {"nelbo": nelbo, "nll": -log_likelihood.mean(), "kl": kl.mean()}

    # -- counterfactuals -------------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: torch.Tensor) -> Abduction:
        """Step 1: posterior-mean latents given (x, pa) in [-1, 1] and the image noise u (deterministic)."""
        self.check_inputs(x, pa)
        activations = self.encoder(x)
        _, _, _, zs, p_locs, p_logscales = self._top_down(pa, activations=activations, sample=False)
        # decode the abducted latents the way prediction will, so pa~ = pa reproduces loc exactly
        loc, logscale, _, _, _, _ = self._top_down(pa, latents=zs)
        noise = (x - loc) / torch.exp(logscale)
        return Abduction(latents=zs, prior_locs=p_locs, prior_logscales=p_logscales, loc=loc, logscale=logscale,
                         noise=noise)

    def predict(self, abducted: Abduction, pa_new: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """Steps 2-3: decode with pa~ and the mixed latents, then x~ = loc~ + scale~ u, on [-1, 1]."""
        alpha = self.config.cf_alpha if alpha is None else float(alpha)
        loc, logscale, _, _, _, _ = self._top_down(pa_new, latents=abducted.latents, abducted=abducted, alpha=alpha)
        return (loc + torch.exp(logscale) * abducted.noise).clamp(-1.0, 1.0)

    def counterfactual(self, images: torch.Tensor, pa: torch.Tensor, pa_new: torch.Tensor,
                       alpha: float | None = None) -> torch.Tensor:
        """DSCM(x, pa, pa~): images (B, 1, S, S) in [0, 1] -> counterfactuals (B, 1, S, S) in [0, 1]."""
        x = images * 2.0 - 1.0
        self.check_inputs(x, pa_new, "images")
        return (self.predict(self.abduct(x, pa), pa_new, alpha) + 1.0) / 2.0

    def decode_mean(self, images: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """The decoder's reconstruction loc given the abducted latents, without the noise u, on [0, 1]."""
        return (self.abduct(images * 2.0 - 1.0, pa).loc + 1.0) / 2.0

    # -- folders ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        return save_module_folder(self, self.config, directory, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CausalHVAE:
        return load_module_folder(cls, HVAEConfig, directory, CONFIG_NAME, WEIGHTS_NAME, "causal model",
                                  missing_hint=" (train one with `cyclex train-causal` or scripts/train_demo_causal.py)")
