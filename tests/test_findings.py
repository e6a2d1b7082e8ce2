import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclex.findings import (
    ABNORMALITIES,
    FINDINGS,
    NO_FINDING,
    FindingLabels,
    LabelState,
    StructuredPrompt,
    UnknownFindingError,
    canonical_finding,
    finding_slug,
    sort_findings,
)


def test_vocabulary_is_chexbert_order():
    assert len(ABNORMALITIES) == 13
    assert FINDINGS[-1] == NO_FINDING
    assert FINDINGS[0] == "Enlarged Cardiomediastinum"
    assert FINDINGS[9] == "Pleural Effusion"
    assert FINDINGS[12] == "Support Devices"


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("Effusion", "Pleural Effusion"),
        ("effusion", "Pleural Effusion"),
        ("Pleural_Thickening", "Pleural Other"),
        ("Nodule", "Lung Lesion"),
        ("Mass", "Lung Lesion"),
        ("lung opacity", "Lung Opacity"),
        ("Enlarged_Cardiomediastinum", "Enlarged Cardiomediastinum"),
        ("  cardiomegaly ", "Cardiomegaly"),
    ],
)
def test_aliases(alias, canonical):
    assert canonical_finding(alias) == canonical


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownFindingError) as err:
        canonical_finding("Hernia of the soul")
    assert "Cardiomegaly" in str(err.value) and "Hernia of the soul" in str(err.value)


def test_label_state_parse_chexpert_codes():
    assert LabelState.parse(1.0) is LabelState.POSITIVE
    assert LabelState.parse(0) is LabelState.NEGATIVE
    assert LabelState.parse(-1) is LabelState.UNCERTAIN
    assert LabelState.parse("") is LabelState.BLANK
    assert LabelState.parse(None) is LabelState.BLANK
    assert LabelState.parse(float("nan")) is LabelState.BLANK
    with pytest.raises(ValueError, match="not a label state"):
        LabelState.parse("maybe")


def test_prompt_from_labels_orders_and_respects_uncertain_setting():
    labels = FindingLabels(
        {"Effusion": "positive", "Cardiomegaly": "uncertain", "Edema": "negative", NO_FINDING: "negative"}
    )
    assert StructuredPrompt.from_labels(labels).text == "The lung with abnormalities Cardiomegaly, Pleural Effusion"
    strict = StructuredPrompt.from_labels(labels, uncertain_as_present=False)
    assert strict.text == "The lung with abnormalities Pleural Effusion"
    assert StructuredPrompt.from_labels(FindingLabels.blank()).text == "The lung with no abnormalities"


def test_remove_and_parse_round_trip():
    prompt = StructuredPrompt(("Pleural Effusion", "Cardiomegaly", "Support Devices"))
    removed = prompt.remove("Effusion")
    assert removed.text == "The lung with abnormalities Cardiomegaly, Support Devices"
    assert prompt.remove("Cardiomegaly", "Pleural Effusion", "Support Devices").text == "The lung with no abnormalities"
    with pytest.raises(ValueError, match="not present"):
        removed.remove("Pleural Effusion")
    assert StructuredPrompt.parse(removed.text) == removed


def test_prism_template():
    prompt = StructuredPrompt(("Cardiomegaly", "Edema"), template="prism")
    assert prompt.text == "Chest X-ray showing Cardiomegaly, Edema"
    assert prompt.remove("Cardiomegaly", "Edema").text == "Normal chest X-ray with no significant findings"
    assert StructuredPrompt.parse("Chest X-ray showing Edema").findings == ("Edema",)
    with pytest.raises(ValueError, match="neither template"):
        StructuredPrompt.parse("A photo of a cat")


def test_no_finding_is_not_an_abnormality():
    with pytest.raises(ValueError, match="No Finding"):
        StructuredPrompt((NO_FINDING,))


def test_slug_is_file_safe():
    assert finding_slug("Pleural Effusion") == "pleural_effusion"
    assert all(ch.isalnum() or ch == "_" for f in FINDINGS for ch in finding_slug(f))


@given(st.sets(st.sampled_from(ABNORMALITIES)))
def test_prompt_round_trip_any_subset(subset):
    for template in ("cvlm", "prism"):
        prompt = StructuredPrompt(tuple(subset), template=template)
        assert StructuredPrompt.parse(prompt.text) == prompt
        assert prompt.findings == sort_findings(subset)


def test_labels_round_trip_dict():
    labels = FindingLabels({"Edema": LabelState.UNCERTAIN, "Fracture": "positive"})
    assert FindingLabels.from_dict(labels.to_dict()) == labels
    assert labels["edema"] is LabelState.UNCERTAIN
    assert labels["Atelectasis"] is LabelState.BLANK
