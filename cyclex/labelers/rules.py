"""`RuleLabeler`: the offline report labeler, spaCy rules in the spirit of the CheXpert labeler.

The CheXpert labeler (Irvin et al. 2019) works in three phases, and so does this one:

1. **Mention extraction**: spaCy `Matcher` token patterns on `spacy.blank("en")` + `sentencizer`
   find the phrases of each of the 13 abnormalities (synonyms such as "enlarged cardiac
   silhouette", "ET tube", "blunting of the costophrenic angle"), set as `doc.ents`. Overlaps
   resolve to the longest match as in spaCy's EntityRuler, so "pericardial effusion" (ignored)
   beats "effusion". Patterns are tried only where their first word occurs (the Matcher's cost is
   patterns x tokens), so a dense 1 MB report takes a few seconds. Normal statements
   ("heart size is normal", "the lungs are clear", "costophrenic angles are sharp") are mentions
   too and always count as negative for the findings they rule out:

   ======================================  ===============================================
   statement                               negative for
   ======================================  ===============================================
   heart (size / silhouette) is normal     Cardiomegaly
   cardiomediastinal silhouette is normal  Cardiomegaly, Enlarged Cardiomediastinum
   mediastinal contours are normal         Enlarged Cardiomediastinum
   the lungs are clear                     Lung Opacity, Consolidation (clear = no airspace
                                           opacity; edema, nodules etc. are not implied)
   costophrenic angles are sharp,          Pleural Effusion
   pleural spaces are clear
   ======================================  ===============================================

   "No acute cardiopulmonary process" mentions nothing; it leaves the findings blank and the report
   gets "No Finding" by the aggregation rule below. Phrases that contain a finding word but name
   something else are ignored: other anatomy ("thyroid mass", "pericardial effusion"), healed
   granulomatous infection (no pneumonia), pleural-parenchymal scarring (lung, not pleura).
2. **Negation**: negspacy's `Negex` (NegEx, Chapman et al. 2001; its entity loop made linear in
   the report length) with its ``en_clinical`` termset, adapted for radiology: cues added ("clear of", "resolution of",
   "removal of", "has resolved", "has been removed", "no longer" ...), cues that signal
   uncertainty rather than negation removed ("versus", "rule out", "evaluate for"), and the
   uncertain phrases that contain a negation word ("cannot be excluded", "not ruled out") made
   pseudo-negations so they do not negate. A negation ends at "with" and at a comma after a closed
   clause ("no effusion seen, small nodule"); ".." ends a sentence. A negation word inside a
   mention ("heart is not enlarged") negates it too.
3. **Uncertainty**: ConText-style triggers of our own, matched with spaCy's `Matcher`: forward
   triggers ("possible", "concerning for", "may represent", "cannot exclude") cover mentions after
   them up to the end of the sentence or a termination cue ("but", "however", ";" ...); backward
   triggers ("cannot be excluded", "is not excluded") cover the mentions before them back to the
   sentence start, a termination cue or a comma; "versus" covers the nearest mention before it and
   those after it up to a comma. Adjectives that occur on either side of a finding ("possible",
   "likely", "suspected") look forward onto the mentions they qualify (up to "with") and backward
   only when predicative ("pneumonia is possible"), so "cardiomegaly with probable pulmonary
   hypertension" keeps its cardiomegaly; modals ("may") look back at their subject when no mention
   follows. "History of" removes the mentions it covers (they are not findings of this study). A
   negated mention stays negative: "no definite pneumothorax". The rules were tuned on the
   development half of 3080 Open-i reports with expert labels; `benchmarks/labeler.py` measures the
   other half.

Per report the mentions aggregate as in CheXpert: any positive mention -> positive, else any
uncertain -> uncertain, else negative; never mentioned -> blank. "No Finding" is positive when no
abnormality other than Support Devices is positive or uncertain (CheXpert's rule), blank otherwise;
an empty or whitespace-only report is blank everywhere.

Why negspacy plus our own uncertainty and not medspacy: medspacy 1.3 (whose ConText does both)
pulls medspacy_quickumls, which forces numpy < 2 and breaks opencv-python-headless 5 and pandas 3.
negspacy 1.1 installs cleanly beside numpy 2 but only negates, so uncertainty is written here on
spaCy's `Matcher` (a few dozen lines, below).
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import spacy
from negspacy.negation import Negex
from negspacy.termsets import termset
from spacy.attrs import LOWER
from spacy.matcher import Matcher, PhraseMatcher
from spacy.pipeline import Sentencizer
from spacy.tokens import Doc, Span

from cyclex.findings import ABNORMALITIES, NO_FINDING, FindingLabels, LabelState
from cyclex.labelers.base import check_report_texts

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Phrase mini-language: one token per space-separated item, matched on the lower-cased text.
#   word         exactly this token          a|b|c      one of these tokens
#   word?        optional token              {NAME}     a word-set macro below (with its own count)
#   _            any one non-punctuation, non-negation token, optional
# spaCy splits hyphens between letters, so "plate-like" is written "plate - like".
# --------------------------------------------------------------------------------------------------
_MACROS: dict[str, tuple[tuple[str, ...], str]] = {
    # Severity / time words that may sit inside a mention: "moderately enlarged", "stable enlarged".
    "DEG": (("mild", "mildly", "moderate", "moderately", "severe", "severely", "marked", "markedly",
             "slight", "slightly", "minimal", "minimally", "massive", "massively", "significant",
             "significantly", "substantial", "substantially", "stable", "stably", "again", "still",
             "now", "newly", "new", "persistently", "persistent", "somewhat", "very", "more", "less",
             "increasingly", "progressively", "further", "borderline", "at", "least"), "*"),
    # Copulas: "is", "has been", "remains", "appears"; "xxxx" is the de-identification token of the
    # IU X-ray / Open-i reports (which generators trained on them reproduce), often hiding a copula.
    "BE": (("is", "are", "was", "were", "be", "been", "has", "have", "appears", "appear", "remains",
            "remain", "seems", "seem", "looks", "look", "xxxx"), "+"),
    "NOT": (("not", "no", "n't", "never"), "?"),
    # Hedges that may sit inside a predicative mention: "heart is probably enlarged".
    "HEDGE": (("possibly", "probably", "likely", "questionably", "perhaps", "presumably"), "?"),
    "SIDE": (("right", "left", "bilateral", "both", "posterior", "lateral", "the", "a"), "*"),
    "HEARTNOUN": (("size", "silhouette", "silhouettes", "contour", "contours", "shadow"), "*"),
}
_NEGATION_WORDS = ("not", "no", "n't", "never", "without", "nor")

_FINDING_PHRASES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        "{DEG} widened|widening|wide|enlarged mediastinum|mediastinal silhouette|contour|contours?",
        "mediastinal widening|enlargement",
        "widening|enlargement of the? mediastinum",
        "widening|enlargement of the? mediastinal|cardiomediastinal silhouette|contour|contours|size",
        "mediastinum|mediastinal {HEARTNOUN} {BE} {NOT} {HEDGE} {DEG} widened|wide|enlarged",
        "{DEG} enlarged|widened cardiomediastinal silhouette|contour|contours|size?",
        "cardiomediastinal {HEARTNOUN} {BE} {NOT} {HEDGE} {DEG} enlarged|widened|increased",
        "cardiomediastinal enlargement|widening",
        "enlarged cardiomediastinum",
    ),
    "Cardiomegaly": (
        "cardiomegaly",
        "{DEG} enlarged|enlarging heart|cardiac {HEARTNOUN}",
        "cardiac enlargement",
        "enlargement of the? heart|cardiac {HEARTNOUN}",
        "heart|cardiac {HEARTNOUN} {BE} {NOT} {HEDGE} {DEG} enlarged|large|increased",
        "heart|cardiac size|silhouette {HEDGE} {DEG} enlarged",  # telegraphic: "heart size mildly enlarged"
        # "borderline heart size" is read as borderline cardiomegaly, as radiologists mean it
        "borderline heart|cardiac size|enlargement",
        "heart|cardiac {HEARTNOUN} {BE} borderline",  # "heart is borderline in size"
        "increase|increased|increasing in? the? heart|cardiac size",
    ),
    "Lung Opacity": (
        "opacity|opacities|opacification|opacifications|opacified",
        "airspace disease|opacity|opacities|process|processes",
        "air -? space disease|opacity|opacities|process",
        "infiltrate|infiltrates|infiltration|infiltrative",
        "ground -? glass",
    ),
    "Lung Lesion": (
        "nodule|nodules|nodularity|mass|masses|tumor|tumors|tumour|neoplasm|neoplasms|carcinoma",
        # Metastases only in the lung: "metastatic disease" alone is as often in bone.
        "lung|pulmonary metastasis|metastases|metastatic",
        "lung|pulmonary|parenchymal|cavitary|cavitating|spiculated lesion|lesions",
        # "nodular opacity / density" describes an opacity's shape, not a nodule (it stays Lung Opacity)
        "nodular lesion|lesions",
    ),
    "Edema": (
        "edema|oedema",
        "pulmonary vascular|venous? congestion",
        "vascular|venous congestion",
        "congestive heart failure",
        "chf",
        "fluid|volume overload",
        "kerley b? lines",
        "cephalization",
        "vascular redistribution",
    ),
    "Consolidation": ("consolidation|consolidations|consolidative|consolidated",),
    "Pneumonia": (
        "pneumonia|pneumonias|bronchopneumonia|pneumonitis",
        "infection|infections",
        "infectious process|processes|etiology|disease",
    ),
    "Atelectasis": (
        # not "volume loss": after surgery or with fibrosis it is no atelectasis
        "atelectasis|atelectases|atelectatic|collapse|collapsed",
    ),
    "Pneumothorax": ("pneumothorax|pneumothoraces|pneumothoraxes|ptx|hydropneumothorax",),
    "Pleural Effusion": (
        "effusion|effusions",
        "pleural fluid",
        "hydrothorax|hydrothoraces",
        "blunting|blunted|obscuration of {SIDE} costophrenic angle|angles|sulcus|sulci",
        "blunted|blunting {SIDE} costophrenic angle|angles|sulcus|sulci",
        "costophrenic angle|angles|sulcus|sulci blunting",
        "costophrenic angle|angles|sulcus|sulci {BE} {NOT} {HEDGE} {DEG} blunted",
    ),
    "Pleural Other": (
        "pleural thickening|plaque|plaques|scarring|scar|scars|calcification|calcifications|fibrosis",
        "thickening of the? pleura",
        # fissures are pleura: "fissural thickening", "thickening of the minor fissure"
        "fissural|fissure thickening",
        "thickening of the? right|left|minor|major|horizontal|oblique|xxxx? fissure|fissures",
        "fibrothorax",
        "apical cap|capping",
    ),
    "Fracture": ("fracture|fractures|fractured|fx",),
    "Support Devices": (
        "endotracheal|et|tracheostomy|trach|nasogastric|ng|og|orogastric|enteric|feeding|chest|dobhoff"
        "|gastric|nasoenteric|pigtail|thoracostomy|gastrostomy|jejunostomy|g|j|drainage -? tube|tubes",
        "ett",
        "pacemaker|pacemakers|pacer|pacers|aicd|icd|defibrillator|defibrillators|ppm",
        "pacing|pacer|pacemaker|defibrillator|ekg|ecg|epicardial|transvenous lead|leads|wire|wires",
        "picc|piccs",
        "central|venous|arterial|midline|jugular|subclavian|ij|femoral|dialysis|hemodialysis|tunneled"
        "|tunnelled|picc|access line|lines",
        "catheter|catheters",
        "swan -? ganz",
        "port -? a -? cath",
        "portacath|mediport",
        "chest|subclavian|infusion|power port",
        "sternotomy|sternal wires|wire|sutures|suture",
        "median? sternotomy",
        "cerclage wires|wire",
        "clip|clips",
        "stent|stents",
        "prosthetic valve|valves",
        "valve replacement|replacements|prosthesis|prostheses",
        "hardware",
        "impella",
        "intra -? aortic balloon pump",
        "iabp",
        "drain|drains",
        "lines and tubes",
        "tubes and lines",
        "device|devices",
        "loop recorder",
        "ventriculoperitoneal|vp shunt",
        "lvad",
    ),
}

# Normal statements: key -> (findings they make negative, phrases).
_NORMAL_STATEMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "normal heart": (("Cardiomegaly",), (
        "heart|cardiac {HEARTNOUN} {BE} {HEDGE} normal|unremarkable",
        "heart|cardiac {HEARTNOUN} {BE} {HEDGE} within normal limits",
        "normal heart|cardiac size|silhouette|contour|contours",
        "normal -? sized heart",
    )),
    "normal cardiomediastinum": (("Cardiomegaly", "Enlarged Cardiomediastinum"), (
        "cardiomediastinal and? hilar? {HEARTNOUN} {BE} {HEDGE} normal|unremarkable",
        "cardiomediastinal and? hilar? {HEARTNOUN} {BE} {HEDGE} within normal limits",
        "normal cardiomediastinal and? hilar? silhouette|silhouettes|contour|contours|size",
        "heart|cardiac size? and mediastinal|mediastinum contour|contours|silhouette? {BE} normal|unremarkable",
        "heart|cardiac size? and mediastinal|mediastinum contour|contours|silhouette? {BE} within normal limits",
    )),
    "normal mediastinum": (("Enlarged Cardiomediastinum",), (
        "hilar? and? mediastinal and? hilar? {HEARTNOUN} {BE} {HEDGE} normal|unremarkable",
        "hilar? and? mediastinal and? hilar? {HEARTNOUN} {BE} {HEDGE} within normal limits",
        "mediastinum {BE} {HEDGE} normal|unremarkable",
        "normal mediastinal silhouette|contour|contours",
    )),
    "clear lungs": (("Lung Opacity", "Consolidation"), (
        "lung|lungs fields? {BE} _ _ _ clear",
        "clear lung|lungs",
    )),
    "sharp costophrenic angles": (("Pleural Effusion",), (
        "costophrenic angle|angles|sulcus|sulci {BE} sharp|sharply|clear|preserved|normal",
        "sharp costophrenic angle|angles|sulcus|sulci",
        "pleural space|spaces {BE} clear|normal|unremarkable",
    )),
}

# Phrases that contain a finding word but are not that finding.
_IGNORED_PHRASES: tuple[str, ...] = (
    "pericardial effusion|effusions",
    "soft -? tissue edema",
    "subcutaneous|chest wall edema",
    "mass effect",
    "body mass",
    # other anatomy
    "thyroid|breast|axillary|neck|adrenal|renal|hepatic|liver|abdominal mass|masses|nodule|nodules",
    "soft -? tissue mass|masses|nodule|nodules",
    # parenchymal scarring against the pleura, not pleural thickening
    "pleural -? parenchymal|pleuroparenchymal scarring|scar|scars|thickening|opacities|changes",
    # healed granulomatous infection (histoplasmosis, tuberculosis) is no pneumonia
    "granulomatous infection|infections|disease|process",
    "histoplasmosis infection",
)

# ---- negation: negspacy's en_clinical termset, adapted for radiology reports ----
_NEGATION_NOT_CUES = {  # these signal uncertainty in radiology, not negation
    "preceding_negations": ["versus", "evaluate for", "rule out", "rules out", "r/o", "ro"],
}
_NEGATION_EXTRA_CUES = {
    "preceding_negations": ["clear of", "resolution of", "interval resolution of", "removal of",
                            "no longer", "nor", "neither", "absent"],
    "following_negations": ["resolved", "has resolved", "have resolved", "removed", "has been removed",
                            "have been removed", "is absent", "are absent", "is not seen", "are not seen",
                            "is no longer seen", "are no longer seen", "no longer visualized",
                            "is not present", "are not present", "is not identified", "are not identified"],
    "pseudo_negations": ["cannot be excluded", "cannot exclude", "can not be excluded", "can not exclude",
                         "cannot be ruled out", "cannot rule out", "can not be ruled out", "not excluded",
                         "not be excluded", "not been excluded", "not entirely excluded",
                         "cannot be entirely excluded", "not well seen", "not well visualized",
                         "without change", "without interval change", "not changed"],
    # "with" ends a negation: "no cardiomegaly, with small effusions" negates no effusion
    # A comma after the predicate closes the negated clause: "no effusion seen, small nodule".
    "termination": [";", "while", "whereas", "otherwise", "there is", "there are", "and there", "with",
                    "seen ,", "identified ,", "demonstrated ,", "noted ,", "present ,", "visualized ,"],
}

# ---- uncertainty triggers (ConText style), by direction of their scope ----
# Scopes are token rules on `spacy.blank("en")` (no English model, hence no parser is available
# offline): a scope ends at the sentence end, a termination cue, and for some directions a comma or
# "with" (see `RuleLabeler._scoped_mention_starts`).
_FORWARD, _BACKWARD, _BOTH, _POSITIONAL, _MODAL, _EITHER, _HISTORY = (
    "forward", "backward", "both", "positional", "modal", "either", "history")
_UNCERTAINTY_TRIGGERS: dict[str, tuple[str, ...]] = {
    _FORWARD: (
        "suspicious|worrisome for|of", "concerning for", "concern for", "suggestive of", "suggesting",
        "suggests", "suggest", "question of", "question", "questionable", "cannot|can not? exclude",
        "cannot|can not? rule out", "cannot|can not? entirely exclude", "differential diagnosis? includes|include",
        "differential diagnosis of", "differential considerations include", "differential",
        "evaluate|evaluation|assess for", "rule out", "r / o", "to exclude", "possibility of", "presumed",
        "presumably", "equivocal",
        "may|might|could|can represent|reflect|indicate|relate|signify|suggest",
        "may|might|could|can be due|related|secondary|caused|from",
        # these end past the termination cues "with" and "secondary to", which would end their scope
        "may|might|could|can be consistent|compatible|associated with",
        "possibly|probably|likely|presumably|perhaps secondary|related|due to?",
        "possibly|probably|likely|presumably|perhaps consistent|compatible|associated with",
        "favor|favors|favoring",
        # a finding the reader is asked to check for is not reported: "correlate clinically for pneumonia"
        "correlate clinically? for", "clinical correlation for", "symptoms of",
    ),
    _BACKWARD: (
        "cannot|can not? be entirely? excluded", "cannot|can not? be ruled out", "not entirely? excluded",
        "not be excluded", "not been excluded", "not ruled out", "not been ruled out",
        "is|are|be a consideration", "is|are|be a possibility",
    ),
    # "versus" hedges the mention right before it and the alternatives after it in the same clause:
    # "cardiomegaly and small effusion versus pleural thickening" leaves the cardiomegaly alone.
    _BOTH: ("versus", "vs", "vs."),
    # Adjectives and adverbs: forward onto the mention they qualify ("possible pneumonia"), backward
    # when predicative ("pneumonia is possible", "atelectasis, likely.").
    _POSITIONAL: (
        "possible", "possibly", "probable", "probably", "likely", "most|more likely", "suspected",
        "suspect", "suspicious", "questioned", "favored", "suggested", "uncertain", "indeterminate",
        "perhaps", "maybe",
    ),
    # Modals follow their subject: "effusion may be present"; forward when a mention follows.
    _MODAL: ("may", "might", "could"),
    # "difficult to exclude": forward onto a following mention, else backward.
    _EITHER: ("difficult to entirely? exclude",),
    # Historical mentions are not findings of this study: "history of lung mass" is left blank.
    _HISTORY: ("history of", "hx of", "h / o"),
}
_COPULAS = frozenset(("is", "are", "was", "were", "be", "been", "appears", "appear", "remains", "remain",
                      "seems", "seem", "looks", "look"))
# End the forward scope of a qualifying adjective: "probable effusions with mild atelectasis" (a
# comma does not: "possibly cyst, scarring, or pneumonia").
_CLAUSE_BREAKS = frozenset(("with", "without"))

# Label of entity-ruler spans that are normal statements, resp. ignored phrases.
_NORMAL_LABEL_PREFIX = "NORMAL:"
_IGNORED_LABEL = "IGNORED"
_COMMA = ","
_MAX_CHUNK_CHARS = 100_000  # spaCy works on chunks of at most this many characters


def _compile(phrase: str) -> list[list[dict]]:
    """Turn one phrase of the mini-language above into spaCy token patterns.

    For speed the leading optional items are dropped (the longest match still wins, only the
    matched text gets shorter: "moderately enlarged heart" -> "enlarged heart") and alternatives of
    the first token become separate patterns: spaCy's Matcher tries every pattern's first token at
    every position, where a plain `LOWER` equality is cheap and an `IN` set is a Python call.
    """
    pattern: list[dict] = []
    for item in phrase.split():
        if item.startswith("{") and item.endswith("}"):
            words, op = _MACROS[item[1:-1]]
            pattern.append({"LOWER": {"IN": list(words)}, "OP": op})
        elif item == "_":
            pattern.append({"IS_PUNCT": False, "LOWER": {"NOT_IN": list(_NEGATION_WORDS)}, "OP": "?"})
        else:
            optional = len(item) > 1 and item.endswith("?")
            words = (item[:-1] if optional else item).split("|")
            token: dict = {"LOWER": words[0]} if len(words) == 1 else {"LOWER": {"IN": words}}
            if optional:
                token["OP"] = "?"
            pattern.append(token)
    while pattern and pattern[0].get("OP") in ("?", "*"):
        pattern.pop(0)
    if not pattern:
        raise ValueError(f"phrase {phrase!r} has no required token")
    first, rest = pattern[0], pattern[1:]
    if not isinstance(first["LOWER"], dict):
        return [pattern]
    repeat = [first | {"OP": "*"}] if first.get("OP") == "+" else []  # "a+" == "a a*"
    return [[{"LOWER": word}, *repeat, *rest] for word in first["LOWER"]["IN"]]


def _negation_termset() -> dict[str, list[str]]:
    """negspacy's en_clinical termset with our radiology changes (a copy; negspacy's stays intact)."""
    terms = {key: list(values) for key, values in termset("en_clinical").get_patterns().items()}
    for key, drop in _NEGATION_NOT_CUES.items():
        terms[key] = [t for t in terms[key] if t not in drop]
    for key, extra in _NEGATION_EXTRA_CUES.items():
        terms[key] = terms[key] + [t for t in extra if t not in terms[key]]
    return terms


def _split_long_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters, at sentence ends where possible."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if len(sentence) > max_chars and current:
            pieces.append(current)
            current = ""
        while len(sentence) > max_chars:  # a run-on "sentence": cut at the last space before the limit
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut])
            sentence = sentence[cut:].lstrip()
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


class _LinearNegex(Negex):
    """negspacy's `Negex` (same termsets, matching and rules) with its entity loop made linear.

    negspacy slices `doc[start:end].ents` and filters every cue list once per sentence, which is
    quadratic in the report length (a 1 MB report took minutes); here entities and cues are sorted
    once and each sentence takes its share by bisection.
    """

    def negex(self, doc: Doc) -> Doc:
        preceding, following, terminating = self.process_negations(doc)
        boundaries = self.termination_boundaries(doc, terminating)
        preceding, following = sorted(preceding, key=lambda m: m[1]), sorted(following, key=lambda m: m[1])
        preceding_starts, following_starts = [m[1] for m in preceding], [m[1] for m in following]
        ents = sorted(doc.ents, key=lambda e: e.start)
        ent_starts = [e.start for e in ents]
        for start, end in boundaries:
            sub_preceding = preceding[bisect_left(preceding_starts, start):bisect_left(preceding_starts, end)]
            sub_following = following[bisect_left(following_starts, start):bisect_left(following_starts, end)]
            for ent in ents[bisect_left(ent_starts, start):bisect_left(ent_starts, end)]:
                if ent.end <= end:  # as negspacy: only entities inside the boundary
                    self._apply_negation(ent, sub_preceding, sub_following)
        return doc


@dataclass(frozen=True)
class Mention:
    """One finding mention in a report: the matched text and its state.

    For a normal statement ("the lungs are clear") there is one `Mention` per finding it rules out.
    `start_char` / `end_char` index the whitespace-normalised report (see `RuleLabeler.mentions`).
    """

    finding: str
    text: str
    start_char: int
    end_char: int
    state: LabelState


class RuleLabeler:
    """Offline CheXpert-style labeler: spaCy rules, negspacy negation, ConText-style uncertainty.

    `label(reports)` returns one `FindingLabels` per report (all 14 findings), processing the batch
    with `nlp.pipe`. Reports are whitespace-normalised; reports longer than `max_chunk_chars`
    characters are split at sentence ends into pieces labelled together (a 1 MB report works).
    """

    def __init__(self, *, batch_size: int = 64, max_chunk_chars: int = _MAX_CHUNK_CHARS) -> None:
        if batch_size < 1 or max_chunk_chars < 1_000:
            raise ValueError(f"batch_size must be >= 1 and max_chunk_chars >= 1000, "
                             f"got {batch_size} and {max_chunk_chars}")
        self.batch_size = batch_size
        self.max_chunk_chars = max_chunk_chars
        self.nlp = spacy.blank("en")
        self.nlp.max_length = max(self.nlp.max_length, 2 * max_chunk_chars)
        # ".." and "..." end sentences too (spaCy tokenises "effusion.." as "effusion", ".."): a
        # negation must not run on into the next sentence.
        self.nlp.add_pipe("sentencizer", config={"punct_chars": sorted(set(Sentencizer.default_punct_chars)
                                                                       | {"..", "..."})})
        vocab = self.nlp.vocab
        # One small Matcher per first word: every pattern starts with one exact word, so the patterns
        # are tried only where their first word occurs (spaCy's Matcher costs patterns x tokens).
        self._matchers_by_anchor: dict[int, Matcher] = {}
        groups = [(finding, phrases) for finding, phrases in _FINDING_PHRASES.items()]
        groups += [(_NORMAL_LABEL_PREFIX + key, phrases) for key, (_, phrases) in _NORMAL_STATEMENTS.items()]
        groups += [(_IGNORED_LABEL, _IGNORED_PHRASES)]
        for label, phrases in groups:
            for phrase in phrases:
                for pattern in _compile(phrase):
                    anchor = vocab.strings.add(pattern[0]["LOWER"])
                    self._matchers_by_anchor.setdefault(anchor, Matcher(vocab)).add(label, [pattern])
        self._anchor_ids = np.array(sorted(self._matchers_by_anchor), dtype=np.uint64)
        negation_terms = _negation_termset()
        self._negation = _LinearNegex(self.nlp, "negex", neg_termset=negation_terms)
        self._uncertainty_matcher = Matcher(vocab)
        for direction, phrases in _UNCERTAINTY_TRIGGERS.items():
            self._uncertainty_matcher.add(direction, [q for p in phrases for q in _compile(p)])
        self._termination_matcher = PhraseMatcher(vocab, attr="LOWER")
        self._termination_matcher.add("termination",
                                      list(self.nlp.tokenizer.pipe(negation_terms["termination"])))

    # ---- public API ------------------------------------------------------------------------------
    def label(self, reports: Sequence[str]) -> list[FindingLabels]:
        """Label a batch of reports; '' or whitespace-only gives all-blank labels."""
        return [self._aggregate(text, mentions) for text, mentions in self._mentions_batch(reports)]

    def mentions(self, report: str) -> list[Mention]:
        """The finding mentions of one report with their states (for inspection and debugging)."""
        return self._mentions_batch([report])[0][1]

    # ---- the three phases ------------------------------------------------------------------------
    def _mentions_batch(self, reports: Iterable[str]) -> list[tuple[str, list[Mention]]]:
        texts = [" ".join(r.split()) for r in check_report_texts(reports, labeler="RuleLabeler")]
        # Flatten reports into chunks for nlp.pipe, remembering which report and offset each came from.
        chunks: list[tuple[int, int, str]] = []
        for index, text in enumerate(texts):
            offset = 0
            for piece in _split_long_text(text, self.max_chunk_chars):
                offset = text.index(piece, offset)
                chunks.append((index, offset, piece))
                offset += len(piece)
        found: list[list[Mention]] = [[] for _ in texts]
        docs = self.nlp.pipe((piece for _, _, piece in chunks), batch_size=self.batch_size)
        for (index, offset, _), doc in zip(chunks, docs, strict=True):
            self._find_mentions(doc)
            found[index] += self._doc_mentions(self._negation(doc), offset)
        return list(zip(texts, found, strict=True))

    def _find_mentions(self, doc: Doc) -> None:
        """Set `doc.ents` to the finding mentions, longest match first (as spaCy's EntityRuler).

        Each occurrence of a pattern's first word runs that word's patterns on the rest of its
        sentence and keeps the matches that start there.
        """
        lowers = doc.to_array([LOWER]).reshape(-1).astype(np.uint64)
        positions = np.flatnonzero(np.isin(lowers, self._anchor_ids))
        if not len(positions):
            doc.ents = []
            return
        sentence_ends = sorted(sent.end for sent in doc.sents)
        spans = []
        for position in positions.tolist():
            end = sentence_ends[bisect_right(sentence_ends, position)]
            matcher = self._matchers_by_anchor[int(lowers[position])]
            spans += [Span(doc, position, position + stop, label=label)
                      for label, start, stop in matcher(doc[position:end]) if start == 0]
        doc.ents = spacy.util.filter_spans(spans)

    def _doc_mentions(self, doc: Doc, offset: int) -> list[Mention]:
        sentences = list(doc.sents)
        sentence_starts = [sent.start for sent in sentences]
        mention_sentences = {bisect_right(sentence_starts, ent.start) - 1
                             for ent in doc.ents if ent.label_ in _FINDING_PHRASES}
        triggers = spacy.util.filter_spans(
            [Span(doc, sentences[i].start + s, sentences[i].start + e, label=m)
             for i in sorted(mention_sentences) for m, s, e in self._uncertainty_matcher(sentences[i])])
        uncertain_starts, historical_starts = self._scoped_mention_starts(doc, triggers, sentence_starts)
        trigger_tokens = {i for t in triggers if t.label_ != _HISTORY for i in range(t.start, t.end)}
        mentions: list[Mention] = []
        for ent in doc.ents:
            if ent.label_ == _IGNORED_LABEL or ent.start in historical_starts:
                continue
            start, end = offset + ent.start_char, offset + ent.end_char
            if ent.label_.startswith(_NORMAL_LABEL_PREFIX):
                findings, _ = _NORMAL_STATEMENTS[ent.label_[len(_NORMAL_LABEL_PREFIX):]]
                mentions += [Mention(f, ent.text, start, end, LabelState.NEGATIVE) for f in findings]
                continue
            negated = ent._.negex or any(t.lower_ in _NEGATION_WORDS for t in ent)
            # A trigger inside the mention hedges it too: "heart is probably enlarged".
            hedged = ent.start in uncertain_starts or any(t.i in trigger_tokens for t in ent)
            state = (LabelState.NEGATIVE if negated
                     else LabelState.UNCERTAIN if hedged else LabelState.POSITIVE)
            mentions.append(Mention(ent.label_, ent.text, start, end, state))
        return mentions

    def _scoped_mention_starts(self, doc: Doc, triggers: list[Span],
                               sentence_starts: list[int]) -> tuple[set[int], set[int]]:
        """Start tokens of finding mentions in the scope of an uncertainty trigger, resp. a history cue.

        Every scope stays inside its sentence and stops at a termination cue. Forward scopes run to
        there; backward scopes start after the last comma or termination. "versus" covers the
        nearest mention before it and the mentions after it up to a comma. A positional trigger
        (adjective, adverb) right before punctuation looks backward ("pneumonia is possible."); else
        forward onto the mentions before the next comma or "with"; else backward after a copula
        ("pneumonia is possible in the right lower lobe"), and nowhere otherwise ("cardiomegaly with
        probable pulmonary hypertension"). Modals do the same but look backward whenever no mention
        follows ("effusion may be present").

        Works sentence by sentence with sorted token positions and bisection, so a long report costs
        time linear in its length.
        """
        if not triggers:
            return set(), set()
        terminations = self._termination_matcher(doc)
        termination_starts = sorted({s for _, s, _ in terminations})
        termination_ends = sorted({e for _, _, e in terminations})
        comma_positions = [t.i for t in doc if t.text == _COMMA]
        break_positions = [t.i for t in doc if t.lower_ in _CLAUSE_BREAKS]
        finding_starts = sorted(ent.start for ent in doc.ents if ent.label_ in _FINDING_PHRASES)
        sentence_ends = sentence_starts[1:] + [len(doc)]

        def findings_in(lo: int, hi: int) -> list[int]:
            return finding_starts[bisect_left(finding_starts, lo):bisect_left(finding_starts, hi)]

        def next_position(positions: list[int], after: int, limit: int) -> int:
            index = bisect_left(positions, after)
            return min(limit, positions[index]) if index < len(positions) else limit

        uncertain: set[int] = set()
        historical: set[int] = set()
        for trigger in triggers:
            sentence = bisect_right(sentence_starts, trigger.start) - 1
            sent_start, sent_end = sentence_starts[sentence], sentence_ends[sentence]
            forward_end = next_position(termination_starts, trigger.end, sent_end)
            clause_end = next_position(comma_positions, trigger.end, forward_end)
            last_termination = bisect_right(termination_ends, trigger.start) - 1
            last_comma = bisect_left(comma_positions, trigger.start) - 1
            backward_start = max(sent_start,
                                 termination_ends[last_termination] if last_termination >= 0 else 0,
                                 comma_positions[last_comma] + 1 if last_comma >= 0 else 0)
            before, after = findings_in(backward_start, trigger.start), []
            direction = trigger.label_
            if direction == _HISTORY:
                historical.update(findings_in(trigger.end, clause_end))
                continue
            if direction == _BOTH:
                after, before = findings_in(trigger.end, clause_end), before[-1:]
            elif direction == _FORWARD:
                after, before = findings_in(trigger.end, forward_end), []
            elif direction == _BACKWARD:
                pass
            elif direction == _EITHER:
                after = findings_in(trigger.end, forward_end)
                before = [] if after else before
            else:  # positional or modal
                at_clause_end = trigger.end >= sent_end or doc[trigger.end].is_punct
                scope_end = (forward_end if direction == _MODAL
                             else next_position(break_positions, trigger.end, forward_end))
                after = [] if at_clause_end else findings_in(trigger.end, scope_end)
                predicative = (direction == _MODAL or
                               (trigger.start > sent_start and doc[trigger.start - 1].lower_ in _COPULAS))
                before = [] if after or not (at_clause_end or predicative) else before
            uncertain.update(after)
            uncertain.update(before)
        return uncertain, historical

    @staticmethod
    def _aggregate(text: str, mentions: list[Mention]) -> FindingLabels:
        """CheXpert aggregation: positive > uncertain > negative > blank; then No Finding."""
        if not text:
            return FindingLabels.blank()
        states: dict[str, LabelState] = {}
        for finding in ABNORMALITIES:
            seen = {m.state for m in mentions if m.finding == finding}
            for state in (LabelState.POSITIVE, LabelState.UNCERTAIN, LabelState.NEGATIVE):
                if state in seen:
                    states[finding] = state
                    break
        present = {LabelState.POSITIVE, LabelState.UNCERTAIN}
        if not any(states.get(f) in present for f in ABNORMALITIES if f != "Support Devices"):
            states[NO_FINDING] = LabelState.POSITIVE
        return FindingLabels(states)
