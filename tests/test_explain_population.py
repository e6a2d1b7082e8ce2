"""Population metrics: CMIG and KL by hand / scipy, FID against a numpy + scipy Frechet distance, axioms."""

import math

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.stats import entropy
from torch import nn

from cyclex.explain.population import (
    EncoderFeatures,
    axiom_composition,
    axiom_effectiveness,
    axiom_reversibility,
    cmig,
    frechet_distance,
    geometric_mean,
    mean_probability_kl,
)


def test_cmig_is_equation_3_as_written():
    # the SPEC's worked example: sqrt(83.33 * geomean(97.65, 82.84)) = 86.57 (the paper reports 89.35)
    assert cmig([83.33], [97.65, 82.84]) == pytest.approx(86.57, abs=0.01)
    assert cmig([0.81, 0.64], [0.25]) == pytest.approx(math.sqrt(math.sqrt(0.81 * 0.64) * 0.25))
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="retention_metrics must all be > 0"):
        cmig([0.9], [0.5, -0.1])
    with pytest.raises(ValueError, match="no values"):
        cmig([], [0.5])
    with pytest.raises(ValueError, match="NaN"):
        cmig([float("nan")], [0.5])


def test_kl_of_mean_probabilities_by_hand_and_scipy():
    real = np.array([[0.8, 0.2], [0.6, 0.4]])  # mean (0.7, 0.3)
    generated = np.array([[0.5, 0.5], [0.5, 0.5]])  # mean (0.5, 0.5)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert mean_probability_kl(real, generated) == pytest.approx(expected, abs=1e-8)
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 5)), rng.random((30, 5))
    assert mean_probability_kl(a, b) == pytest.approx(entropy(a.mean(0), b.mean(0)), abs=1e-7)
    assert mean_probability_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="pathologies"):
        mean_probability_kl(a, b[:, :4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mean_probability_kl(a * 2, b)


class PatchMeans(nn.Module):
    """A tiny fixed feature extractor: means of the four image quadrants -> (B, 4)."""

    num_features = 4

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        return torch.stack([x[..., :h, :w].mean((1, 2, 3)), x[..., :h, w:].mean((1, 2, 3)),
                            x[..., h:, :w].mean((1, 2, 3)), x[..., h:, w:].mean((1, 2, 3))], dim=1)


def numpy_frechet(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_a_numpy_scipy_frechet_distance():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 1, 8, 8, generator=g)
    fake = (torch.rand(30, 1, 8, 8, generator=g) * 0.7 + 0.2).clamp(0, 1)
    extractor = PatchMeans()
    expected = numpy_frechet(extractor(real).double().numpy(), extractor(fake).double().numpy())
    assert frechet_distance(real, fake, extractor, batch_size=16) == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert frechet_distance(real, real, extractor) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(real[:1], fake, extractor)


def test_encoder_features_adapts_an_image_encoder():
    class Encoder:
        def encode(self, images):
            return PatchMeans()(images)

    module = EncoderFeatures(Encoder(), num_features=4)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(5, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g)
    assert frechet_distance(a, b, module) == pytest.approx(frechet_distance(a, b, PatchMeans()), rel=1e-6)


def brighten_maker(x, pa, pa_new):
    """A hand-made 'DSCM': brightness moves by 0.2 per unit change of the first parent."""
    return (x + 0.2 * (pa_new[:, :1] - pa[:, :1]).view(-1, 1, 1, 1)).clamp(0, 1)


def test_axioms_with_a_hand_made_maker():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 16, 16, generator=g) * 0.5 + 0.25  # room to move without clipping
    pa = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    pa_new = 1 - pa
    composition = axiom_composition(brighten_maker, x, pa, feature_extractor=PatchMeans())
    assert composition.ssim.tolist() == pytest.approx([1.0] * 4)
    assert composition.fid == pytest.approx(0.0, abs=1e-4)
    reversibility = axiom_reversibility(brighten_maker, x, pa, pa_new)
    assert reversibility.ssim_mean == pytest.approx(1.0, abs=1e-5) and reversibility.fid is None

    def predictor(images):  # reads the parent back from brightness: brighter than x -> 1
        return (images.flatten(1).mean(1, keepdim=True) > x.flatten(1).mean(1, keepdim=True)).float()

    # parents 0 -> 1 are brightened (recovered as 1); parents 1 -> 0 are darkened (recovered as 0)
    assert axiom_effectiveness(brighten_maker, x, pa, pa_new, predictor).tolist() == [1.0]
    with pytest.raises(ValueError, match="maker must return images"):
        axiom_composition(lambda x, a, b: x[:, :, :8], x, pa)
    with pytest.raises(ValueError, match=r"pa must be \(B, P\)"):
        axiom_composition(brighten_maker, x, pa[:2])
