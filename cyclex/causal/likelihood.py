"""The discretised Gaussian likelihood of 8-bit images scaled to [-1, 1] (as in VDVAE / causal-gen).

log p(x | loc, scale) is the Gaussian mass of x's bin of width 2/255; the outermost bins take the
tails, so the likelihood is a proper distribution over the 256 grey levels.
"""

from __future__ import annotations

import math

import torch

BIN_HALF_WIDTH = 1.0 / 255.0  # half of a grey level on [-1, 1]


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretised_gaussian_log_likelihood(x: torch.Tensor, loc: torch.Tensor, logscale: torch.Tensor) -> torch.Tensor:
    """Per-pixel log-likelihood (same shape as x); x, loc in [-1, 1], logscale = log standard deviation."""
    centred = x - loc
    inv_scale = torch.exp(-logscale)
    cdf_plus = _standard_normal_cdf(inv_scale * (centred + BIN_HALF_WIDTH))
    cdf_minus = _standard_normal_cdf(inv_scale * (centred - BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def gaussian_kl(q_loc: torch.Tensor, q_logscale: torch.Tensor, p_loc: torch.Tensor, p_logscale: torch.Tensor) -> torch.Tensor:
    """KL(N(q_loc, q_scale^2) || N(p_loc, p_scale^2)) per element."""
    return (p_logscale - q_logscale
            + 0.5 * (torch.exp(2 * q_logscale) + (q_loc - p_loc) ** 2) / torch.exp(2 * p_logscale) - 0.5)
