"""Acceptance of a counterfactual: FET score and CF_Score (seed 000, eqs. 2-3), PRISM's CLIP filter.

- `fet_score`: FET = CPG - log(LL1 * LL2) (seed 000 eq. 2), LL1 / LL2 the L1 / L2 distances between
  image embeddings of F and CF (`faithfulness.embedding_distances`).
- `cf_score`: CF_Score = 1(LPIPS < t) + 1(CLIP > t) + 1(L2 < t) + 1(CPG > t) + 1(FET > t), 0..5
  (seed 000 eq. 3) with Table 2 thresholds as defaults (`CFThresholds`). A criterion is `failed`
  only when its value was computed and misses the threshold; one whose scorer is missing (NaN value)
  is `unavailable`, one whose threshold was set for another scorer `not_applicable` (Table 2's 0.92 is
  a CLIP cosine; on other embeddings it means nothing). Neither passes, neither counts as failed.
- `CounterfactualScorer`: computes every raw value for a batch and scores it; `describe()` says which
  scorer stands behind each criterion (`cyclex.provenance`).
- `passes_directional_filter`: PRISM / LANCE keep an edit when S_CLIP >= 0.1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from cyclex.explain.effectiveness import Classifier, counterfactual_probability_gain
from cyclex.explain.faithfulness import (
    ImageEncoder,
    LPIPSMetric,
    _image_pair,
    embedding_distances,
    pixel_l1,
    pixel_l2,
)

__all__ = [
    "CRITERIA",
    "FET_LOG_FLOOR",
    "DIRECTIONAL_SIMILARITY_THRESHOLD",
    "fet_score",
    "CFThresholds",
    "CFScoreResult",
    "cf_score",
    "CounterfactualScore",
    "CounterfactualScorer",
    "passes_directional_filter",
]

# log(LL1 * LL2) is floored here so identical embeddings give a large finite FET instead of +inf.
FET_LOG_FLOOR = 1e-12
# PRISM drops edits whose CLIP directional similarity is below this.
DIRECTIONAL_SIMILARITY_THRESHOLD = 0.1
# The five CF_Score criteria, in eq. 3's order.
CRITERIA = ("lpips", "clip", "l2", "cpg", "fet")


def fet_score(cpg, clip_l1, clip_l2) -> torch.Tensor:
    """FET = CPG - log(LL1 * LL2) (seed 000 eq. 2), elementwise over (B,) tensors or floats.

    The product is floored at `FET_LOG_FLOOR` (**choice**): the paper leaves LL1 * LL2 = 0 undefined.
    """
    cpg = torch.as_tensor(cpg, dtype=torch.float64)
    product = torch.as_tensor(clip_l1, dtype=torch.float64) * torch.as_tensor(clip_l2, dtype=torch.float64)
    if torch.isnan(cpg).any() or torch.isnan(product).any():
        raise ValueError("fet_score got NaN inputs")
    if (product < 0).any():
        raise ValueError("fet_score: embedding distances must be >= 0")
    return (cpg - torch.log(product.clamp_min(FET_LOG_FLOOR))).float()


@dataclass(frozen=True)
class CFThresholds:
    """Acceptance thresholds, seed 000 Table 2 defaults; per study, all overridable."""

    lpips: float = 0.2  # LPIPS(F, CF) < lpips
    clip: float = 0.92  # cosine of CLIP image embeddings > clip
    l2: float = 0.3  # pixel RMSE on [0, 1] < l2
    cpg: float = 0.1  # CPG > cpg
    fet: float = 4.0  # FET > fet


@dataclass
class CFScoreResult:
    """CF_Score in 0..5 and what became of each of the five criteria (names: `CRITERIA`).

    passed: criterion -> bool (False also for unavailable and not applicable ones); failed: computed
    and missed the threshold; unavailable: no value (the scorer is missing or could not score this
    item); not_applicable: the threshold belongs to another scorer. Accepted = all five passed.
    """

    score: int
    passed: dict[str, bool]
    failed: list[str]
    unavailable: list[str] = field(default_factory=list)
    not_applicable: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.score == len(self.passed)

    @property
    def determined(self) -> bool:
        """Accepted or rejected on computed values: every criterion scored, or one computed failure."""
        return bool(self.failed) or not (self.unavailable or self.not_applicable)


def cf_score(lpips: float, clip_cosine: float, l2: float, cpg: float, fet: float,
             thresholds: CFThresholds | None = None, not_applicable=()) -> CFScoreResult:
    """CF_Score (seed 000 eq. 3) for one counterfactual; strict inequalities as in the paper.

    A NaN (or None) value makes its criterion unavailable; a criterion named in `not_applicable`
    (its threshold was set for another scorer) is not applicable. Neither passes nor fails.
    """
    t = thresholds or CFThresholds()
    unknown = set(not_applicable) - set(CRITERIA)
    if unknown:
        raise ValueError(f"cf_score: not_applicable names unknown criteria {sorted(unknown)}; criteria: {CRITERIA}")
    values = {"lpips": lpips, "clip": clip_cosine, "l2": l2, "cpg": cpg, "fet": fet}
    values = {k: math.nan if v is None else float(v) for k, v in values.items()}
    meets = {
        "lpips": values["lpips"] < t.lpips,
        "clip": values["clip"] > t.clip,
        "l2": values["l2"] < t.l2,
        "cpg": values["cpg"] > t.cpg,
        "fet": values["fet"] > t.fet,
    }
    not_applicable = [name for name in CRITERIA if name in set(not_applicable)]
    unavailable = [name for name in CRITERIA if name not in not_applicable and math.isnan(values[name])]
    passed = {name: bool(meets[name]) and name not in not_applicable and name not in unavailable for name in CRITERIA}
    failed = [name for name in CRITERIA if not passed[name] and name not in not_applicable and name not in unavailable]
    return CFScoreResult(score=sum(passed.values()), passed=passed, failed=failed, unavailable=unavailable,
                         not_applicable=not_applicable)


@dataclass
class CounterfactualScore(CFScoreResult):
    """A `CFScoreResult` with the raw values it was computed from."""

    values: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class CounterfactualScorer:
    """Scores factual / counterfactual pairs with one encoder, one classifier and (optionally) LPIPS.

    `score(factual (B, 1, H, W) [0, 1], counterfactual, target_finding)` -> B `CounterfactualScore`s
    with values: lpips (NaN without an LPIPS metric: that criterion is unavailable), clip_cosine,
    clip_l1, clip_l2, l1, l2, cpg, fet. not_applicable: criteria whose threshold belongs to another
    scorer (e.g. ("clip", "fet") for Table 2 thresholds on an encoder that is not CLIP); they never pass.
    thresholds_provenance: where the thresholds come from (Table 2, a calibration file), for `describe`.
    """

    def __init__(self, encoder: ImageEncoder, classifier: Classifier, lpips: LPIPSMetric | None = None,
                 thresholds: CFThresholds | None = None, not_applicable=(),
                 thresholds_provenance: dict | None = None) -> None:
        self.encoder = encoder
        self.classifier = classifier
        self.lpips = lpips
        self.thresholds = thresholds or CFThresholds()
        unknown = set(not_applicable) - set(CRITERIA)
        if unknown:
            raise ValueError(f"CounterfactualScorer: not_applicable names unknown criteria {sorted(unknown)}")
        self.not_applicable = tuple(name for name in CRITERIA if name in set(not_applicable))
        self.thresholds_provenance = thresholds_provenance

    def describe(self) -> dict:
        """Which scorer stands behind each criterion (`cyclex.provenance.describe_scorer`), the thresholds
        and their source, and the criteria that are not applicable."""
        from cyclex.provenance import describe_scorer

        return {
            "lpips": describe_scorer(self.lpips, "lpips") or {"role": "lpips", "name": None,
                                                              "note": "no LPIPS metric: criterion unavailable"},
            "clip_encoder": describe_scorer(self.encoder, "clip_encoder"),
            "cpg_classifier": describe_scorer(self.classifier, "cpg_classifier"),
            "thresholds": {**asdict(self.thresholds), "source": (self.thresholds_provenance
                                                                 or {"name": "CFThresholds as given"})},
            "not_applicable": list(self.not_applicable),
        }

    def raw_values(self, factual, counterfactual, target_finding) -> dict[str, torch.Tensor]:
        factual, counterfactual = _image_pair(factual, counterfactual)
        cosine, clip_l1, clip_l2 = embedding_distances(self.encoder.encode(factual), self.encoder.encode(counterfactual))
        batch = factual.shape[0]
        try:
            cpg = counterfactual_probability_gain(self.classifier, factual, counterfactual, target_finding)
        except KeyError:  # the classifier has no class for this finding: CPG and FET are unavailable
            cpg = torch.full((batch,), math.nan)
        lpips = self.lpips(factual, counterfactual) if self.lpips is not None else torch.full((batch,), math.nan)
        return {
            "lpips": lpips,
            "clip_cosine": cosine,
            "clip_l1": clip_l1,
            "clip_l2": clip_l2,
            "l1": pixel_l1(factual, counterfactual),
            "l2": pixel_l2(factual, counterfactual),
            "cpg": cpg,
            "fet": fet_score(cpg, clip_l1, clip_l2) if not torch.isnan(cpg).any() else torch.full((batch,), math.nan),
        }

    def score(self, factual, counterfactual, target_finding) -> list[CounterfactualScore]:
        raw = self.raw_values(factual, counterfactual, target_finding)
        results = []
        for i in range(len(raw["cpg"])):
            values = {k: float(v[i]) for k, v in raw.items()}
            base = cf_score(values["lpips"], values["clip_cosine"], values["l2"], values["cpg"], values["fet"],
                            self.thresholds, not_applicable=self.not_applicable)
            results.append(CounterfactualScore(score=base.score, passed=base.passed, failed=base.failed,
                                               unavailable=base.unavailable, not_applicable=base.not_applicable,
                                               values=values))
        return results


def passes_directional_filter(similarity, threshold: float = DIRECTIONAL_SIMILARITY_THRESHOLD) -> torch.Tensor:
    """PRISM's CLIP directional filter: keep edits with S_CLIP >= threshold (drop < 0.1). (B,) bool."""
    similarity = torch.as_tensor(similarity, dtype=torch.float32)
    if torch.isnan(similarity).any():
        raise ValueError("directional similarity contains NaN")
    return similarity >= threshold
