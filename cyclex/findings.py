"""The findings vocabulary and the structured prompts built from it (SPEC section 1, seed 003).

The vocabulary is CheXbert's: 13 abnormalities plus "No Finding", spelled and ordered exactly as
CheXbert / CheXpert do, so that labels, prompts and classifier targets line up everywhere.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ABNORMALITIES: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NO_FINDING = "No Finding"
FINDINGS: tuple[str, ...] = ABNORMALITIES + (NO_FINDING,)

# Input spellings accepted besides the canonical names (torchxrayvision / NIH ChestX-ray14 names,
# common shorthands). Keys are compared after `_normalise_key`.
_ALIASES: dict[str, str] = {
    "effusion": "Pleural Effusion",
    "pleural effusion": "Pleural Effusion",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "lesion": "Lung Lesion",
    "pleural thickening": "Pleural Other",
    "infiltration": "Lung Opacity",
    "opacity": "Lung Opacity",
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum",
    "support device": "Support Devices",
    "devices": "Support Devices",
    "normal": NO_FINDING,
    "no findings": NO_FINDING,
}


def _normalise_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_LOOKUP: dict[str, str] = {_normalise_key(n): n for n in FINDINGS}
_LOOKUP.update({_normalise_key(k): v for k, v in _ALIASES.items()})


class UnknownFindingError(ValueError):
    """A finding name that is neither canonical nor a known alias."""


def canonical_finding(name: str) -> str:
    """Return the canonical CheXbert spelling of `name` (canonical names and aliases accepted).

    Raises `UnknownFindingError` listing the valid names when `name` is not recognised.
    """
    if not isinstance(name, str):
        raise UnknownFindingError(f"finding name must be a string, got {type(name).__name__}: {name!r}")
    try:
        return _LOOKUP[_normalise_key(name)]
    except KeyError:
        raise UnknownFindingError(
            f"unknown finding {name!r}; valid names are: {', '.join(FINDINGS)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})"
        ) from None


def finding_index(name: str) -> int:
    """Position of a finding in the fixed vocabulary order."""
    return FINDINGS.index(canonical_finding(name))


def sort_findings(names: Iterable[str]) -> tuple[str, ...]:
    """Canonicalise, deduplicate and order findings in the vocabulary's fixed order."""
    unique = {canonical_finding(n) for n in names}
    return tuple(f for f in FINDINGS if f in unique)


def finding_slug(name: str) -> str:
    """File-name-safe slug of a finding, e.g. 'Pleural Effusion' -> 'pleural_effusion'."""
    return re.sub(r"[^a-z0-9]+", "_", canonical_finding(name).lower()).strip("_")


class LabelState(enum.Enum):
    """CheXbert's four classes for one finding in one report."""

    BLANK = "blank"  # not mentioned
    POSITIVE = "positive"
    NEGATIVE = "negative"
    UNCERTAIN = "uncertain"

    @classmethod
    def parse(cls, value: object) -> LabelState:
        """Accept the enum, its name/value, or the CheXpert CSV codes (1, 0, -1, empty)."""
        if isinstance(value, LabelState):
            return value
        if value is None:
            return cls.BLANK
        if isinstance(value, float) and value != value:  # NaN in a pandas/CSV column
            return cls.BLANK
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            codes = {1: cls.POSITIVE, 0: cls.NEGATIVE, -1: cls.UNCERTAIN}
            if value in codes:
                return codes[int(value)]
        if isinstance(value, str):
            text = value.strip().lower()
            by_text = {
                "": cls.BLANK, "blank": cls.BLANK, "nan": cls.BLANK,
                "positive": cls.POSITIVE, "1": cls.POSITIVE, "1.0": cls.POSITIVE,
                "negative": cls.NEGATIVE, "0": cls.NEGATIVE, "0.0": cls.NEGATIVE,
                "uncertain": cls.UNCERTAIN, "-1": cls.UNCERTAIN, "-1.0": cls.UNCERTAIN,
            }
            if text in by_text:
                return by_text[text]
        raise ValueError(
            f"label value {value!r} is not a label state; expected one of positive, negative, "
            "uncertain, blank or the CheXpert codes 1, 0, -1, empty"
        )

    @property
    def chexpert_code(self) -> float | None:
        return {"positive": 1.0, "negative": 0.0, "uncertain": -1.0, "blank": None}[self.value]


@dataclass(frozen=True)
class FindingLabels:
    """Labels of one report: a state for each of the 14 findings (missing ones are BLANK)."""

    states: Mapping[str, LabelState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {canonical_finding(k): LabelState.parse(v) for k, v in dict(self.states).items()}
        full = {f: clean.get(f, LabelState.BLANK) for f in FINDINGS}
        object.__setattr__(self, "states", full)

    def __getitem__(self, finding: str) -> LabelState:
        return self.states[canonical_finding(finding)]

    def present(self, uncertain_as_present: bool = True) -> tuple[str, ...]:
        """Abnormalities that count as present, in vocabulary order (No Finding never counts)."""
        wanted = {LabelState.POSITIVE} | ({LabelState.UNCERTAIN} if uncertain_as_present else set())
        return tuple(f for f in ABNORMALITIES if self.states[f] in wanted)

    def to_dict(self) -> dict[str, str]:
        return {f: s.value for f, s in self.states.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FindingLabels:
        return cls({k: LabelState.parse(v) for k, v in data.items()})

    @classmethod
    def blank(cls) -> FindingLabels:
        return cls({})


# Prompt templates. "cvlm" is seed 003's structured prompt, "prism" seed 002's caption.
CVLM_TEMPLATE = "cvlm"
PRISM_TEMPLATE = "prism"
TEMPLATES = (CVLM_TEMPLATE, PRISM_TEMPLATE)

_CVLM_PREFIX = "The lung with abnormalities "
_CVLM_EMPTY = "The lung with no abnormalities"
_PRISM_PREFIX = "Chest X-ray showing "
_PRISM_EMPTY = "Normal chest X-ray with no significant findings"


@dataclass(frozen=True)
class StructuredPrompt:
    """An ordered set of present abnormalities rendered with one template.

    `StructuredPrompt(("Cardiomegaly", "Pleural Effusion")).text` ->
    "The lung with abnormalities Cardiomegaly, Pleural Effusion".
    """

    findings: tuple[str, ...] = ()
    template: str = CVLM_TEMPLATE

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        ordered = sort_findings(self.findings)
        if NO_FINDING in ordered:
            raise ValueError("'No Finding' is not an abnormality and cannot appear in a structured prompt")
        object.__setattr__(self, "findings", ordered)

    @classmethod
    def from_labels(
        cls, labels: FindingLabels, *, uncertain_as_present: bool = True, template: str = CVLM_TEMPLATE
    ) -> StructuredPrompt:
        return cls(labels.present(uncertain_as_present=uncertain_as_present), template=template)

    @property
    def text(self) -> str:
        if self.template == PRISM_TEMPLATE:
            return _PRISM_PREFIX + ", ".join(self.findings) if self.findings else _PRISM_EMPTY
        return _CVLM_PREFIX + ", ".join(self.findings) if self.findings else _CVLM_EMPTY

    def __str__(self) -> str:
        return self.text

    def __contains__(self, finding: str) -> bool:
        return canonical_finding(finding) in self.findings

    def remove(self, *findings: str) -> StructuredPrompt:
        """The prompt without the given findings; removing an absent finding is an error."""
        drop = sort_findings(findings)
        missing = [f for f in drop if f not in self.findings]
        if missing:
            raise ValueError(f"cannot remove {missing} from prompt {self.text!r}: not present")
        return StructuredPrompt(tuple(f for f in self.findings if f not in drop), template=self.template)

    def with_template(self, template: str) -> StructuredPrompt:
        return StructuredPrompt(self.findings, template=template)

    @classmethod
    def parse(cls, text: str) -> StructuredPrompt:
        """Parse a prompt written by either template back into a StructuredPrompt."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a string, got {type(text).__name__}")
        stripped = text.strip().rstrip(".")
        if stripped == _CVLM_EMPTY:
            return cls((), CVLM_TEMPLATE)
        if stripped == _PRISM_EMPTY:
            return cls((), PRISM_TEMPLATE)
        for prefix, template in ((_CVLM_PREFIX, CVLM_TEMPLATE), (_PRISM_PREFIX, PRISM_TEMPLATE)):
            if stripped.startswith(prefix):
                names = [n for n in (p.strip() for p in stripped[len(prefix):].split(",")) if n]
                return cls(tuple(names), template)
        raise ValueError(
            f"prompt {text!r} follows neither template: expected {_CVLM_PREFIX!r}..., {_CVLM_EMPTY!r}, "
            f"{_PRISM_PREFIX!r}... or {_PRISM_EMPTY!r}"
        )


def removed_findings(source_prompt: str, target_prompt: str) -> tuple[str, ...]:
    """The findings the target prompt drops from the source prompt (both parsed by `StructuredPrompt.parse`)."""
    source = StructuredPrompt.parse(source_prompt).findings
    target = set(StructuredPrompt.parse(target_prompt).findings)
    return tuple(f for f in source if f not in target)
