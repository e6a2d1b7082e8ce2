"""FET and CF_Score by hand; the scorer with a hand-set encoder and classifier."""

import math

import pytest
import torch

from cyclex.explain.effectiveness import CallableClassifier
from cyclex.explain.scores import (
    FET_LOG_FLOOR,
    CFThresholds,
    CounterfactualScorer,
    cf_score,
    fet_score,
    passes_directional_filter,
)


def test_fet_by_hand():
    # FET = CPG - log(LL1 * LL2) = 0.5 - log(0.1 * 0.2)
    assert float(fet_score(0.5, 0.1, 0.2)) == pytest.approx(0.5 - math.log(0.02), rel=1e-6)
    values = fet_score(torch.tensor([1.0, 0.0]), torch.tensor([1.0, math.e]), torch.tensor([1.0, 1.0]))
    assert values.tolist() == pytest.approx([1.0, -1.0], abs=1e-6)
    assert float(fet_score(0.0, 0.0, 0.3)) == pytest.approx(-math.log(FET_LOG_FLOOR), rel=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        fet_score(float("nan"), 0.1, 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        fet_score(0.1, -0.1, 0.1)


def test_cf_score_by_hand_and_strict_thresholds():
    all_pass = cf_score(lpips=0.1, clip_cosine=0.95, l2=0.1, cpg=0.5, fet=5.0)
    assert all_pass.score == 5 and all_pass.failed == [] and all_pass.accepted
    # values exactly at the Table 2 thresholds fail (strict inequalities)
    at_threshold = cf_score(lpips=0.2, clip_cosine=0.92, l2=0.3, cpg=0.1, fet=4.0)
    assert at_threshold.score == 0
    assert at_threshold.failed == ["lpips", "clip", "l2", "cpg", "fet"]
    mixed = cf_score(lpips=0.3, clip_cosine=0.95, l2=0.1, cpg=0.05, fet=4.5)
    assert mixed.score == 3 and mixed.failed == ["lpips", "cpg"]
    assert mixed.passed == {"lpips": False, "clip": True, "l2": True, "cpg": False, "fet": True}
    assert not mixed.accepted
    loose = CFThresholds(lpips=0.5, cpg=0.0)
    assert cf_score(0.3, 0.95, 0.1, 0.05, 4.5, thresholds=loose).score == 5
    # an uncomputed metric never passes, and is reported unavailable, not failed
    no_value = cf_score(float("nan"), 0.95, 0.1, 0.5, 5.0)
    assert (no_value.score, no_value.failed, no_value.unavailable) == (4, [], ["lpips"])
    assert not no_value.accepted and not no_value.determined
    assert cf_score(float("nan"), 0.95, 0.4, 0.5, 5.0).determined  # rejected on l2 whatever LPIPS says
    # a threshold set for another scorer: not applicable, never passed, never failed
    other_encoder = cf_score(0.1, 0.95, 0.1, 0.5, 5.0, not_applicable=("clip", "fet"))
    assert (other_encoder.score, other_encoder.failed, other_encoder.not_applicable) == (3, [], ["clip", "fet"])
    with pytest.raises(ValueError, match="unknown criteria"):
        cf_score(0.1, 0.95, 0.1, 0.5, 5.0, not_applicable=("cosine",))


class MeanEncoder:
    """encode -> (mean, 1): embeddings move only with image brightness."""

    def encode(self, images):
        return torch.stack([images.flatten(1).mean(1), torch.ones(len(images))], dim=1)


def test_counterfactual_scorer_with_hand_set_models():
    classifier = CallableClassifier(lambda x: 10 * x.flatten(1).mean(1, keepdim=True), ["Cardiomegaly"])
    scorer = CounterfactualScorer(MeanEncoder(), classifier, lpips=lambda a, b: torch.full((len(a),), 0.05))
    factual = torch.full((1, 1, 4, 4), 0.5)
    counterfactual = torch.full((1, 1, 4, 4), 0.4)
    (result,) = scorer.score(factual, counterfactual, "Cardiomegaly")
    v = result.values
    assert v["cpg"] == pytest.approx(1.0, abs=1e-6)  # 10 * 0.5 - 10 * 0.4
    assert v["l2"] == pytest.approx(0.1, abs=1e-6) and v["l1"] == pytest.approx(0.1, abs=1e-6)
    # unit embeddings of (0.5, 1) and (0.4, 1)
    a = torch.tensor([0.5, 1.0]) / math.hypot(0.5, 1.0)
    b = torch.tensor([0.4, 1.0]) / math.hypot(0.4, 1.0)
    assert v["clip_l1"] == pytest.approx(float((a - b).abs().sum()), rel=1e-5)
    assert v["clip_l2"] == pytest.approx(float((a - b).norm()), rel=1e-5)
    assert v["clip_cosine"] == pytest.approx(float(a @ b), rel=1e-6)
    assert v["fet"] == pytest.approx(1.0 - math.log(v["clip_l1"] * v["clip_l2"]), rel=1e-5)
    assert result.score == 5 and result.to_dict()["values"]["cpg"] == v["cpg"]
    # without LPIPS its criterion is unavailable and says so
    (no_lpips,) = CounterfactualScorer(MeanEncoder(), classifier).score(factual, counterfactual, "Cardiomegaly")
    assert no_lpips.unavailable == ["lpips"] and no_lpips.failed == [] and no_lpips.score == 4
    # a finding the classifier has no class for: CPG and FET unavailable, the item still scored
    (no_class,) = scorer.score(factual, counterfactual, "Edema")
    assert no_class.unavailable == ["cpg", "fet"] and no_class.score == 3 and not no_class.accepted
    described = CounterfactualScorer(MeanEncoder(), classifier, not_applicable=("clip", "fet")).describe()
    assert described["lpips"]["note"] == "no LPIPS metric: criterion unavailable"
    assert described["clip_encoder"]["name"].endswith("MeanEncoder") and described["not_applicable"] == ["clip", "fet"]


def test_directional_filter_keeps_at_and_above_point_one():
    assert passes_directional_filter(torch.tensor([0.05, 0.1, 0.4])).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="NaN"):
        passes_directional_filter([float("nan")])
