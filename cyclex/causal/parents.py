"""The parents pa of the image in the causal graph, as one float vector per image.

Columns: `age` (normalised to [-1, 1], continuous), `sex` (1 male, 0 female), then one binary column
per finding (1 present). Findings come from a phantom's labels, a structured prompt, or a labeler;
age and sex from the phantom metadata or, where no one knows them (a query in the cycle), from the
parent predictor (`ParentPredictor.abduct_attributes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cyclex.datasets.phantom_attributes import AGE_RANGE, REFERENCE_AGE
from cyclex.datasets.phantom_findings import DRAWABLE
from cyclex.findings import canonical_finding

AGE, SEX = "age", "sex"
_AGE_HALF_RANGE = (AGE_RANGE[1] - AGE_RANGE[0]) / 2


def normalise_age(age_years: float) -> float:
    return (float(age_years) - REFERENCE_AGE) / _AGE_HALF_RANGE


def age_in_years(age_normalised: float) -> float:
    return float(age_normalised) * _AGE_HALF_RANGE + REFERENCE_AGE


@dataclass(frozen=True)
class ParentSchema:
    """Names and kinds of the parent columns; `findings` are binary, age continuous, sex binary."""

    findings: tuple[str, ...] = DRAWABLE

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings", tuple(canonical_finding(f) for f in self.findings))
        if not self.findings:
            raise ValueError("ParentSchema.findings must name at least one finding")

    @property
    def names(self) -> tuple[str, ...]:
        return (AGE, SEX, *self.findings)

    @property
    def size(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        key = name if name in (AGE, SEX) else canonical_finding(name)
        if key not in self.names:
            raise KeyError(f"parent {name!r} is not in the schema; parents: {list(self.names)}")
        return self.names.index(key)

    @property
    def binary_columns(self) -> tuple[int, ...]:
        return tuple(range(1, self.size))

    @property
    def finding_columns(self) -> tuple[int, ...]:
        return tuple(range(2, self.size))

    def vector(self, age_years: float, sex: str, findings_present: Sequence[str]) -> torch.Tensor:
        """(P,) float32 parent vector."""
        if sex not in ("female", "male"):
            raise ValueError(f"sex must be 'female' or 'male', got {sex!r}")
        present = {canonical_finding(f) for f in findings_present}
        unknown = present - set(self.findings)
        if unknown:
            raise ValueError(f"findings {sorted(unknown)} are not parents of this model; parents: {list(self.findings)}")
        values = [normalise_age(age_years), 1.0 if sex == "male" else 0.0]
        values += [1.0 if f in present else 0.0 for f in self.findings]
        return torch.tensor(values, dtype=torch.float32)

    def from_record(self, record: Mapping) -> torch.Tensor:
        """Parents of a phantom record (metadata.jsonl line or `phantom_record`); needs its attributes."""
        attributes = record.get("attributes")
        if not attributes:
            raise ValueError(f"phantom record {record.get('id')!r} has no 'attributes' (age, sex): make the phantoms "
                             "with PhantomConfig(attributes=True) / `cyclex phantoms --attributes`")
        present = [f for f in record.get("findings_meta", {}) if canonical_finding(f) in self.findings]
        return self.vector(attributes["age"], attributes["sex"], present)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "findings": list(self.findings), "age_range": list(AGE_RANGE),
                "reference_age": REFERENCE_AGE}
