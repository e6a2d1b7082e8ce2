"""Anatomical priors: the phantoms' true finding masks lie inside their finding's prior."""

from __future__ import annotations

import numpy as np
import pytest

from cyclex.datasets.phantom import PhantomConfig, make_phantoms
from cyclex.datasets.seed_registry import ANATOMICAL_PRIOR_CHECK, ANATOMICAL_PRIOR_FITTING
from cyclex.explain.anatomical_priors import FINDING_PRIORS, PRIOR_FITTING_SEED, anatomical_prior

CHECK_SEED = ANATOMICAL_PRIOR_CHECK.set_seed  # not the fitting set


def test_true_masks_lie_inside_their_prior():
    assert CHECK_SEED != PRIOR_FITTING_SEED == ANATOMICAL_PRIOR_FITTING.set_seed
    inside: dict[str, list[float]] = {}
    for phantom in make_phantoms(150, CHECK_SEED, PhantomConfig(size=64)):
        for finding, mask in phantom.masks.items():
            if finding in FINDING_PRIORS and mask.any():
                prior = anatomical_prior(finding, mask.shape, phantom.chest_box)
                inside.setdefault(finding, []).append(float((mask & prior).sum() / mask.sum()))
    assert len(inside) >= 8
    for finding, shares in inside.items():
        assert np.mean(shares) >= 0.98, (finding, np.mean(shares))
        # the prior rules something out: it is smaller than the image for every finding but the lung-wide ones
    heart = anatomical_prior("Cardiomegaly", (64, 64), (10, 10, 50, 50))
    assert heart[30, 45] and not heart[30, 12] and not heart[12, 30]


def test_prior_by_hand_and_fallbacks():
    mask = anatomical_prior("Pleural Effusion", (10, 10), (0, 0, 10, 10))  # v from 0.3 -> rows 3..9
    expected = np.zeros((10, 10), bool)
    expected[3:, :] = True
    np.testing.assert_array_equal(mask, expected)
    assert anatomical_prior("Support Devices", (8, 8), (0, 0, 8, 8)).all()
    assert anatomical_prior("Cardiomegaly", (8, 8), None).all()
    with pytest.raises(ValueError, match="chest_box"):
        anatomical_prior("Cardiomegaly", (8, 8), (0, 0, 9, 9))
