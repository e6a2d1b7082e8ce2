"""Patient attributes of the phantom world and the causal graph they sit in (issue 20, SPEC section 5).

With `PhantomConfig(attributes=True)` every phantom gets an age and a sex, drawn first from their own
random stream of the seed; they are causal parents of the anatomy and of the findings:

    age -> heart size, bone contrast (ribs, clavicles), finding prevalence
    sex -> lung field shape (height, width), heart size, finding prevalence
    age, sex -> findings -> image;  anatomy -> image

The exogenous noise of every node is the seed's own random streams: the anatomy's shape draws, one
uniform per finding that decides its presence (`present iff u_f < rate_f(age, sex)`), the findings'
severities and placements, the exposure and the sensor noise. Redrawing the same seed with an
attribute forced (`phantom.do_attribute`) keeps all of them and re-evaluates only the mechanisms,
which is the world's true counterfactual under do(attribute = value) (Pearl's abduction, action,
prediction with the noise known exactly).

With attributes off (the default) none of this runs and the phantoms are bit-identical to the world
before attributes existed (tests/test_causal_phantom.py checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SEXES = ("female", "male")
AGE_RANGE = (20.0, 90.0)  # years; ages are drawn uniformly in this range
REFERENCE_AGE = 55.0  # the age at which age changes nothing (the middle of AGE_RANGE)

# Prevalence multipliers per unit of normalised age (age_n in [-1, 1]) and of sex (male +1, female -1).
# Older patients: more heart failure findings, fractures, lesions; young tall men: more pneumothoraces.
AGE_PREVALENCE_SLOPE: dict[str, float] = {
    "Cardiomegaly": 0.8,
    "Enlarged Cardiomediastinum": 0.5,
    "Pleural Effusion": 0.6,
    "Edema": 0.6,
    "Fracture": 0.5,
    "Lung Lesion": 0.5,
    "Pneumothorax": -0.5,
}
SEX_PREVALENCE_SLOPE: dict[str, float] = {
    "Pneumothorax": 0.3,
    "Cardiomegaly": 0.15,
}


@dataclass(frozen=True)
class PatientAttributes:
    """A phantom patient's age (years) and sex ("female" or "male")."""

    age: float
    sex: str

    def __post_init__(self) -> None:
        if self.sex not in SEXES:
            raise ValueError(f"PatientAttributes.sex must be one of {SEXES}, got {self.sex!r}")
        if not AGE_RANGE[0] <= float(self.age) <= AGE_RANGE[1]:
            raise ValueError(f"PatientAttributes.age must be in {list(AGE_RANGE)} years, got {self.age!r}")
        object.__setattr__(self, "age", float(self.age))

    @property
    def age_normalised(self) -> float:
        """Age mapped to [-1, 1] (0 at REFERENCE_AGE)."""
        return (self.age - REFERENCE_AGE) / ((AGE_RANGE[1] - AGE_RANGE[0]) / 2)

    @property
    def sex_sign(self) -> float:
        """+1 male, -1 female."""
        return 1.0 if self.sex == "male" else -1.0

    def to_dict(self) -> dict:
        return {"age": self.age, "sex": self.sex}

    def replaced(self, changes: Mapping[str, object]) -> PatientAttributes:
        """These attributes with some set (do(attribute = value)); unknown names are refused."""
        unknown = set(changes) - {"age", "sex"}
        if unknown:
            raise ValueError(f"attributes: unknown names {sorted(unknown)}; the phantom world has age and sex")
        return PatientAttributes(age=float(changes.get("age", self.age)), sex=str(changes.get("sex", self.sex)))


def sample_attributes(rng: np.random.Generator) -> PatientAttributes:
    """Age uniform in AGE_RANGE, sex female or male with probability 1/2 (the root nodes of the graph)."""
    age = float(rng.uniform(*AGE_RANGE))
    sex = SEXES[int(rng.random() < 0.5)]
    return PatientAttributes(age=age, sex=sex)


@dataclass(frozen=True)
class AnatomyEffects:
    """How the attributes change the normal anatomy (multipliers and shifts applied after its draws)."""

    heart_scale: float = 1.0  # heart silhouette axes
    lung_height_shift: float = 0.0  # costophrenic angles move down by this (patient coordinates)
    lung_width_shift: float = 0.0  # lateral lung borders move out by this
    bone_contrast: float = 1.0  # ribs and clavicles brightness multiplier


def anatomy_effects(attributes: PatientAttributes) -> AnatomyEffects:
    """The anatomy mechanism: older hearts are larger and bones fainter; men have taller, wider lungs."""
    a, s = attributes.age_normalised, attributes.sex_sign
    return AnatomyEffects(
        heart_scale=(1.0 + 0.09 * a) * (1.0 + 0.03 * s),
        lung_height_shift=0.025 * s,
        lung_width_shift=0.012 * s,
        bone_contrast=1.0 - 0.45 * a,
    )


def finding_rates(base: Mapping[str, float], attributes: PatientAttributes) -> dict[str, float]:
    """The findings mechanism's rates: base prevalence times (1 + slope_age * age_n) (1 + slope_sex * sex), clipped."""
    a, s = attributes.age_normalised, attributes.sex_sign
    rates = {}
    for finding, rate in base.items():
        factor = (1.0 + AGE_PREVALENCE_SLOPE.get(finding, 0.0) * a) * (1.0 + SEX_PREVALENCE_SLOPE.get(finding, 0.0) * s)
        rates[finding] = float(np.clip(rate * factor, 0.0, 1.0))
    return rates
