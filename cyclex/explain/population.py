"""Population-level metrics for sets of counterfactuals (SPEC sections 3 and 5; seeds 001 and 004).

- `cmig`: CMIG = sqrt(geomean(a_i) * geomean(f_j)) (InstructX2X eq. 3) over accuracy metrics a
  (pathology AUROC against target labels) and retention metrics f (race AUROC, age Pearson r).
  **Documented discrepancy** (SPEC section 3): eq. 3 as written does not reproduce the paper's own
  Table 2 from its columns (InstructX2X: sqrt(83.33 * geomean(97.65, 82.84)) = 86.57, reported 89.35;
  LLM-CXR's age r = 0.10 would pull its CMIG near 11, reported 52.06). We implement eq. 3 exactly and
  never tune to the table.
- `mean_probability_kl`: KL(P || Q) between mean predicted pathology probabilities of the real (P)
  and generated (Q) sets.
- `frechet_distance`: FID via torchmetrics' `FrechetInceptionDistance(feature=<nn.Module>)` with a
  pluggable feature extractor (torchxrayvision DenseNet features in real use, any small module in
  tests); `EncoderFeatures` turns any `ImageEncoder` into such a module.
- Causal axioms (Monteiro et al., seed 004) for any maker-like callable `f(x, pa, pa_new) -> x_new`:
  `axiom_effectiveness`, `axiom_composition`, `axiom_reversibility`, measured with SSIM and FID.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cyclex.explain.faithfulness import ImageEncoder, as_image_batch, ssim

__all__ = [
    "geometric_mean",
    "cmig",
    "mean_probability_kl",
    "EncoderFeatures",
    "frechet_distance",
    "AxiomResult",
    "axiom_effectiveness",
    "axiom_composition",
    "axiom_reversibility",
]

Maker = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def geometric_mean(values: Sequence[float], name: str = "values") -> float:
    """Geometric mean of positive numbers (raises for empty input, NaN or values <= 0)."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"{name}: geometric mean of no values")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN: {array.tolist()}")
    if (array <= 0).any():
        raise ValueError(f"{name} must all be > 0 for a geometric mean, got {array.tolist()}")
    return float(np.exp(np.log(array).mean()))


def cmig(accuracy_metrics: Sequence[float], retention_metrics: Sequence[float]) -> float:
    """CMIG = sqrt(geomean(accuracy) * geomean(retention)) (InstructX2X eq. 3, implemented as written).

    Inputs on one scale (all in [0, 1] or all in percent); the result is on that scale. A retention
    metric <= 0 (e.g. a negative age correlation) makes CMIG undefined and raises.
    """
    return math.sqrt(geometric_mean(accuracy_metrics, "accuracy_metrics")
                     * geometric_mean(retention_metrics, "retention_metrics"))


def mean_probability_kl(probabilities_real, probabilities_generated, normalize: bool = True,
                        eps: float = 1e-10) -> float:
    """KL(P || Q) = sum_k P_k log(P_k / Q_k), P / Q the mean predicted pathology probabilities of the
    real / generated set ((N, K) and (M, K) arrays in [0, 1]).

    With `normalize=True` (**choice**, default) the K mean probabilities are rescaled to sum to 1 so
    P and Q are distributions over pathologies (multi-label outputs do not sum to 1); `eps` keeps
    log finite. Returns nats >= 0.
    """
    p_all = np.asarray(probabilities_real, dtype=np.float64)
    q_all = np.asarray(probabilities_generated, dtype=np.float64)
    for name, array in (("probabilities_real", p_all), ("probabilities_generated", q_all)):
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N, K) array, got shape {array.shape}")
        if np.isnan(array).any() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name} must hold probabilities in [0, 1] without NaN")
    if p_all.shape[1] != q_all.shape[1]:
        raise ValueError(f"real and generated sets have {p_all.shape[1]} and {q_all.shape[1]} pathologies")
    p, q = p_all.mean(0) + eps, q_all.mean(0) + eps
    if normalize:
        p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


class EncoderFeatures(nn.Module):
    """An `ImageEncoder` (B, 1, H, W) [0, 1] -> (B, D) as the nn.Module torchmetrics' FID expects."""

    def __init__(self, encoder: ImageEncoder, num_features: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_features = int(num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(images)


@torch.no_grad()
def frechet_distance(real, generated, feature_extractor: nn.Module, batch_size: int = 64) -> float:
    """FID between two image sets, (N, 1, H, W) and (M, 1, H, W) in [0, 1], N, M >= 2.

    `feature_extractor`: nn.Module mapping such a batch to (B, D) features (set `num_features` to skip
    torchmetrics' dummy forward). ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = as_image_batch(real, name="real")
    generated = as_image_batch(generated, name="generated")
    if real.shape[0] < 2 or generated.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {real.shape[0]} real and {generated.shape[0]} generated")
    metric = FrechetInceptionDistance(feature=feature_extractor, input_img_size=tuple(real.shape[1:]))
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, images.shape[0], batch_size):
            metric.update(images[start:start + batch_size], real=is_real)
    return float(metric.compute())


@dataclass
class AxiomResult:
    """SSIM per image between the two sides of an axiom, their mean, and FID when an extractor was given."""

    ssim: torch.Tensor
    ssim_mean: float
    fid: float | None = None


def _check_parents(pa, batch: int, name: str) -> torch.Tensor:
    pa = torch.as_tensor(pa, dtype=torch.float32)
    if pa.ndim == 1:
        pa = pa[:, None]
    if pa.ndim != 2 or pa.shape[0] != batch:
        raise ValueError(f"{name} must be (B, P) with B = {batch}, got {tuple(pa.shape)}")
    if torch.isnan(pa).any():
        raise ValueError(f"{name} contains NaN")
    return pa


def _call_maker(maker: Maker, x: torch.Tensor, pa: torch.Tensor, pa_new: torch.Tensor) -> torch.Tensor:
    out = maker(x, pa, pa_new)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"maker must return images of shape {tuple(x.shape)}, got {shape}")
    return as_image_batch(out, name="maker output")


def _axiom(x: torch.Tensor, x_other: torch.Tensor, feature_extractor: nn.Module | None) -> AxiomResult:
    values = ssim(x, x_other)
    fid = frechet_distance(x, x_other, feature_extractor) if feature_extractor is not None else None
    return AxiomResult(ssim=values, ssim_mean=float(values.mean()), fid=fid)


@torch.no_grad()
def axiom_effectiveness(maker: Maker, x, pa, pa_new, parent_predictor: Callable[[torch.Tensor], torch.Tensor],
                        threshold: float = 0.5) -> torch.Tensor:
    """Effectiveness: share of counterfactuals x~ = f(x, pa, pa~) whose predicted parents equal pa~,
    per parent column -> (P,) in [0, 1]. Binary parents; `parent_predictor(x) -> (B, P)` probabilities
    thresholded at `threshold`."""
    x = as_image_batch(x, name="x")
    pa = _check_parents(pa, x.shape[0], "pa")
    pa_new = _check_parents(pa_new, x.shape[0], "pa_new")
    predicted = torch.as_tensor(parent_predictor(_call_maker(maker, x, pa, pa_new)), dtype=torch.float32)
    if predicted.ndim == 1:
        predicted = predicted[:, None]
    if predicted.shape != pa_new.shape:
        raise ValueError(f"parent_predictor returned {tuple(predicted.shape)}, expected {tuple(pa_new.shape)}")
    return ((predicted >= threshold).float() == (pa_new >= 0.5).float()).float().mean(0)


@torch.no_grad()
def axiom_composition(maker: Maker, x, pa, feature_extractor: nn.Module | None = None) -> AxiomResult:
    """Composition: x == f(x, pa, pa) (null intervention); SSIM(x, f(x, pa, pa)) and FID."""
    x = as_image_batch(x, name="x")
    pa = _check_parents(pa, x.shape[0], "pa")
    return _axiom(x, _call_maker(maker, x, pa, pa), feature_extractor)


@torch.no_grad()
def axiom_reversibility(maker: Maker, x, pa, pa_new, feature_extractor: nn.Module | None = None) -> AxiomResult:
    """Reversibility: x == f(f(x, pa, pa~), pa~, pa); SSIM and FID between x and the round trip."""
    x = as_image_batch(x, name="x")
    pa = _check_parents(pa, x.shape[0], "pa")
    pa_new = _check_parents(pa_new, x.shape[0], "pa_new")
    counterfactual = _call_maker(maker, x, pa, pa_new)
    return _axiom(x, _call_maker(maker, counterfactual, pa_new, pa), feature_extractor)
