"""Ground-truth reports of phantoms, and the labels that come from the same choices.

Each sentence is chosen together with the label states it asserts, so the labels can never
disagree with the report: a finding is POSITIVE when a sentence affirms it, UNCERTAIN when a
sentence hedges it ("Possible small left pleural effusion."), NEGATIVE when a sentence negates it
("No pleural effusion."), BLANK when the report does not mention it. "No Finding" follows CheXpert:
POSITIVE when no abnormality other than Support Devices is positive or uncertain.

Two styles:
- "varied": several radiology phrasings per finding, negations of some absent findings, normal
  statements ("Heart size is normal.", "Lungs are clear.", "No acute cardiopulmonary process."),
  and hedged sentences for some mild findings. "Lungs are clear." negates Lung Opacity and
  Consolidation (clear lungs have no airspace disease), as `cyclex.labelers.RuleLabeler` reads it.
- "canonical": one fixed sentence per finding in vocabulary order and one fixed normal report; no
  negations and no hedging. Small demo generators learn this style reliably.
"""

from __future__ import annotations

import numpy as np

from cyclex.findings import ABNORMALITIES, NO_FINDING, FindingLabels, LabelState

REPORT_STYLES = ("varied", "canonical")
CANONICAL_NORMAL_REPORT = "No acute cardiopulmonary abnormality."

# Findings that may be reported with hedging when drawn mild.
HEDGEABLE = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Edema",
             "Consolidation", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Fracture")
# Findings the lungs-are-clear statement would contradict.
_LUNG_FINDINGS = ("Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Atelectasis", "Pneumothorax",
                  "Pleural Effusion")

_SIZE = {"mild": "small", "moderate": "moderate", "severe": "large"}
_DEGREE = {"mild": "mild", "moderate": "moderate", "severe": "severe"}
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_ZONE = {"upper": "upper", "mid": "mid", "lower": "lower"}

Sentence = tuple[str, dict[str, LabelState]]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _positive_text(finding: str, meta: dict, rng: np.random.Generator) -> str:
    sev = meta.get("severity") or "moderate"
    side = meta.get("side")
    zone = _ZONE.get(meta.get("zone") or "mid", "mid")
    if finding == "Cardiomegaly":
        return _pick(rng, [f"{_cap(_DEGREE[sev])} cardiomegaly.", f"The heart is {_ADVERB[sev]} enlarged.",
                           f"{_cap(_DEGREE[sev])} enlargement of the cardiac silhouette."])
    if finding == "Enlarged Cardiomediastinum":
        return _pick(rng, [f"The mediastinum is {_ADVERB[sev]} widened.", "Widened mediastinum.",
                           "Mediastinal widening is present."])
    if finding == "Lung Opacity":
        if side == "bilateral":
            return _pick(rng, [f"Patchy bilateral {zone} lung opacities.", f"There are bilateral {zone} lung opacities."])
        return _pick(rng, [f"{_cap(side)} {zone} lung opacity.", f"Patchy opacity in the {side} {zone} lung.",
                           f"There is an opacity in the {side} {zone} lung."])
    if finding == "Lung Lesion":
        if sev == "severe":
            return _pick(rng, [f"{_cap(side)} {zone} lung mass.", f"There is a mass in the {side} {zone} lung."])
        size = "small " if sev == "mild" else ""
        return _pick(rng, [f"There is a {size}nodule in the {side} {zone} lung.", f"{_cap(size + side)} {zone} lung nodule."])
    if finding == "Edema":
        return _pick(rng, [f"{_cap(_DEGREE[sev])} pulmonary edema.", f"There is {_DEGREE[sev]} interstitial edema.",
                           f"{_cap(_DEGREE[sev])} perihilar pulmonary edema."])
    if finding == "Consolidation":
        return _pick(rng, [f"Consolidation in the {side} {zone} lung.", f"{_cap(side)} {zone} lung consolidation.",
                           f"There is dense consolidation in the {side} {zone} lung."])
    if finding == "Atelectasis":
        if side == "bilateral":
            return _pick(rng, ["Bibasilar atelectasis.", "There is bibasilar plate-like atelectasis."])
        return _pick(rng, [f"{_cap(side)} basilar atelectasis.", f"Plate-like atelectasis at the {side} lung base."])
    if finding == "Pneumothorax":
        return _pick(rng, [f"{_cap(_SIZE[sev])} {side} pneumothorax.", f"There is a {_SIZE[sev]} {side} apical pneumothorax."])
    if finding == "Pleural Effusion":
        if side == "bilateral":
            return _pick(rng, [f"{_cap(_SIZE[sev])} bilateral pleural effusions.",
                               f"There are {_SIZE[sev]} bilateral pleural effusions."])
        return _pick(rng, [f"{_cap(_SIZE[sev])} {side} pleural effusion.", f"There is a {_SIZE[sev]} {side} pleural effusion.",
                           f"{_cap(_SIZE[sev])} {side} pleural effusion blunting the costophrenic angle."])
    if finding == "Fracture":
        return _pick(rng, [f"There is a {side} rib fracture.", f"Displaced fracture of a {side} posterior rib.",
                           f"Acute {side} rib fracture."])
    if finding == "Support Devices":
        parts = []
        for device in meta.get("devices", ["pacemaker"]):
            parts.append({
                "pacemaker": _pick(rng, ["A left chest wall pacemaker is present.", "Left-sided pacemaker with a lead in the heart."]),
                "endotracheal tube": _pick(rng, ["Endotracheal tube in standard position.",
                                                 "An endotracheal tube terminates above the carina."]),
                "central line": _pick(rng, ["A right-sided central venous catheter ends in the superior vena cava.",
                                            "Right subclavian central line in place."]),
                "nasogastric tube": _pick(rng, ["Nasogastric tube courses below the diaphragm.",
                                                "A nasogastric tube extends into the stomach."]),
            }[device])
        return " ".join(parts)
    raise ValueError(f"no report wording for finding {finding!r}")


def _uncertain_text(finding: str, meta: dict, rng: np.random.Generator) -> str:
    side = meta.get("side")
    zone = _ZONE.get(meta.get("zone") or "mid", "mid")
    side_word = "bilateral" if side == "bilateral" else side
    texts = {
        "Cardiomegaly": ["Possible mild cardiomegaly.", "The heart is possibly mildly enlarged."],
        "Enlarged Cardiomediastinum": ["Possible mild mediastinal widening."],
        "Lung Opacity": [f"Possible faint opacity in the {side_word} {zone} lung."],
        "Lung Lesion": [f"Possible small nodule in the {side_word} {zone} lung."],
        "Edema": ["Possible mild pulmonary edema.", "Mild pulmonary edema cannot be excluded."],
        "Consolidation": [f"Possible {side_word} {zone} lung consolidation."],
        "Atelectasis": [f"Possible {side_word} basilar atelectasis."],
        "Pneumothorax": [f"Possible small {side_word} apical pneumothorax."],
        "Pleural Effusion": [f"Possible small {side_word} pleural effusion.", f"Possible small {side_word} effusion."],
        "Fracture": [f"Possible nondisplaced {side_word} rib fracture."],
    }
    return _pick(rng, texts[finding])


_NEGATIONS: dict[str, list[str]] = {
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly.", "The heart is not enlarged.", "Normal heart size."],
    "Enlarged Cardiomediastinum": ["The mediastinum is not widened.", "No mediastinal widening."],
    "Lung Opacity": ["No focal opacity."],
    "Lung Lesion": ["No pulmonary nodules.", "No suspicious lung nodule."],
    "Edema": ["No pulmonary edema.", "No evidence of pulmonary edema."],
    "Consolidation": ["No focal consolidation.", "No consolidation."],
    "Atelectasis": ["No atelectasis."],
    "Pneumothorax": ["No pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "No effusion."],
    "Fracture": ["No acute rib fracture.", "No displaced fracture."],
}
# How often an absent finding is explicitly negated in a varied report.
_NEGATION_RATE = {"Cardiomegaly": 0.6, "Enlarged Cardiomediastinum": 0.25, "Lung Opacity": 0.15, "Lung Lesion": 0.15,
                  "Edema": 0.25, "Consolidation": 0.35, "Atelectasis": 0.1, "Pneumothorax": 0.5,
                  "Pleural Effusion": 0.55, "Fracture": 0.2}

# Order in which a radiologist walks through the film.
_READING_ORDER = ("Support Devices", "Cardiomegaly", "Enlarged Cardiomediastinum", "Lung Opacity", "Consolidation",
                  "Lung Lesion", "Edema", "Atelectasis", "Pleural Effusion", "Pneumothorax", "Fracture")

_CANONICAL: dict[str, str] = {
    "Enlarged Cardiomediastinum": "The mediastinum is widened.",
    "Cardiomegaly": "The heart is enlarged.",
    "Lung Opacity": "There is a {side} lung opacity.",
    "Lung Lesion": "There is a {side} lung nodule.",
    "Edema": "There is pulmonary edema.",
    "Consolidation": "There is {side} lung consolidation.",
    "Atelectasis": "There is {side} basilar atelectasis.",
    "Pneumothorax": "There is a {side} pneumothorax.",
    "Pleural Effusion": "There is a {side} pleural effusion.",
    "Fracture": "There is a {side} rib fracture.",
    "Support Devices": "Support devices are present.",
}
_CANONICAL_BILATERAL = {
    "Lung Opacity": "There are bilateral lung opacities.",
    "Atelectasis": "There is bibasilar atelectasis.",
    "Pleural Effusion": "There are bilateral pleural effusions.",
}


def _no_finding_state(states: dict[str, LabelState]) -> LabelState:
    abnormal = [f for f in ABNORMALITIES if f != "Support Devices"
                and states.get(f) in (LabelState.POSITIVE, LabelState.UNCERTAIN)]
    return LabelState.BLANK if abnormal else LabelState.POSITIVE


def canonical_report(findings: dict[str, dict]) -> tuple[str, FindingLabels]:
    """The fixed report of present findings (uncertainty flags are ignored: all are positive)."""
    sentences = []
    states: dict[str, LabelState] = {}
    for finding in ABNORMALITIES:
        if finding not in findings:
            continue
        side = findings[finding].get("side")
        template = _CANONICAL_BILATERAL.get(finding) if side == "bilateral" else None
        sentences.append((template or _CANONICAL[finding]).format(side=side))
        states[finding] = LabelState.POSITIVE
    states[NO_FINDING] = _no_finding_state(states)
    if not sentences:
        sentences = [CANONICAL_NORMAL_REPORT]
    return " ".join(sentences), FindingLabels(states)


def varied_report(findings: dict[str, dict], rng: np.random.Generator) -> tuple[str, FindingLabels]:
    """A report in varied radiology wording; `findings[f]["uncertain"]` hedges a finding."""
    sentences: list[str] = []
    states: dict[str, LabelState] = {}
    negate_pair = "Pleural Effusion" not in findings and "Pneumothorax" not in findings and rng.random() < 0.35
    for finding in _READING_ORDER:
        meta = findings.get(finding)
        if meta is not None:
            if meta.get("uncertain"):
                sentences.append(_uncertain_text(finding, meta, rng))
                states[finding] = LabelState.UNCERTAIN
            else:
                sentences.append(_positive_text(finding, meta, rng))
                states[finding] = LabelState.POSITIVE
            continue
        if finding == "Support Devices":
            continue
        if finding == "Pleural Effusion" and negate_pair:
            sentences.append("No pleural effusion or pneumothorax.")
            states["Pleural Effusion"] = states["Pneumothorax"] = LabelState.NEGATIVE
            continue
        if finding == "Pneumothorax" and negate_pair:
            continue
        if rng.random() < _NEGATION_RATE[finding]:
            sentences.append(_pick(rng, _NEGATIONS[finding]))
            states[finding] = LabelState.NEGATIVE
        if finding == "Atelectasis" and not any(f in findings for f in _LUNG_FINDINGS) and rng.random() < 0.6:
            # "Clear" lungs rule out airspace disease (as the CheXpert-style rule labeler reads it).
            sentences.append("Lungs are clear.")
            states["Lung Opacity"] = states["Consolidation"] = LabelState.NEGATIVE
    states[NO_FINDING] = _no_finding_state(states)
    if states[NO_FINDING] is LabelState.POSITIVE and rng.random() < 0.7:
        sentences.append(_pick(rng, ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality."]))
    if not sentences:
        sentences.append("No acute cardiopulmonary process.")
    return " ".join(sentences), FindingLabels(states)


def phantom_report(findings: dict[str, dict], style: str, rng: np.random.Generator) -> tuple[str, FindingLabels]:
    """Report and labels for the given present findings (name -> meta) in `style`."""
    if style == "canonical":
        return canonical_report(findings)
    if style == "varied":
        return varied_report(findings, rng)
    raise ValueError(f"report_style must be one of {REPORT_STYLES}, got {style!r}")
