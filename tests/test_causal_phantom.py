"""Phantom-world attributes (issue 20): off by default and bit-identical; do(attribute) is the true counterfactual."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cyclex.datasets.phantom import (
    PhantomConfig,
    ShortcutConfig,
    do_attribute,
    make_phantom,
    make_phantoms,
    phantom_record,
    without_finding,
)
from cyclex.datasets.phantom_attributes import AGE_PREVALENCE_SLOPE, SEX_PREVALENCE_SLOPE

# sha256 over images, masks, metadata records and every without_finding image of 12 phantoms of set
# 7400, computed with the code of commit e942f3a (before attributes existed)
BEFORE_ATTRIBUTES = {
    "64-False": "c5250f9064ca3b81a4aa650d83c8129932341bc75ab7b3b970b9d2514f382572",
    "64-True": "7d04b4c91bb0edf1a5083d1b146d950cb630376093d548c3c61ed769de270689",
    "96-False": "db2041838ff60c51c0c9c8b6df3491717ec01d72adf5899a3eda330bb9ca4824",
    "96-True": "629c05ac5b759bd0dab30b1b2c9d74af33a319034fccb608a220f480e869c405",
}


@pytest.mark.parametrize("key", sorted(BEFORE_ATTRIBUTES))
def test_attributes_off_keeps_every_phantom_bit_identical(key):
    size, with_shortcut = int(key.split("-")[0]), key.endswith("True")
    config = PhantomConfig(size=size, shortcut=ShortcutConfig() if with_shortcut else None)
    assert config.attributes is False  # the default
    digest = hashlib.sha256()
    for phantom in make_phantoms(12, 7400, config):
        assert phantom.attributes is None
        digest.update(phantom.image.tobytes())
        for finding, mask in sorted(phantom.masks.items()):
            digest.update(finding.encode())
            digest.update(mask.tobytes())
        record = phantom_record(phantom, "i", {}, None)
        assert "attributes" not in record
        digest.update(json.dumps(record, sort_keys=True).encode())
        for finding in sorted(phantom.findings_meta):
            digest.update(without_finding(phantom, finding, config).image.tobytes())
    assert digest.hexdigest() == BEFORE_ATTRIBUTES[key]


CONFIG = PhantomConfig(attributes=True)


def _phantoms(n=60):
    return make_phantoms(n, 20_999, CONFIG)


def test_attributes_are_drawn_recorded_and_forced_only_when_on():
    phantom = _phantoms(1)[0]
    assert set(phantom.attributes) == {"age", "sex"} and phantom.attributes["sex"] in ("female", "male")
    assert phantom_record(phantom, "i", {}, None)["attributes"] == phantom.attributes
    with pytest.raises(ValueError, match="attributes=True"):
        make_phantom(5, PhantomConfig(), attributes={"age": 40})
    with pytest.raises(ValueError, match="unknown names"):
        make_phantom(5, CONFIG, attributes={"height": 180})


def test_do_with_the_same_value_reproduces_the_patient_exactly():
    for phantom in _phantoms(10):
        same = do_attribute(phantom, CONFIG, age=phantom.attributes["age"])
        assert np.array_equal(same.image, phantom.image)
        assert same.findings_meta == phantom.findings_meta


def test_do_age_direct_effect_changes_the_anatomy_only():
    for phantom in _phantoms(10):
        older = do_attribute(phantom, CONFIG, keep_findings=True, age=89.0)
        assert older.attributes == {"age": 89.0, "sex": phantom.attributes["sex"]}
        assert older.findings_meta == phantom.findings_meta and older.report == phantom.report
        assert not np.array_equal(older.image, phantom.image)  # heart and bones follow age
        # outside the body (the top corners are air) nothing changes: exposure and sensor noise are kept
        assert np.array_equal(older.image[:4, :4], phantom.image[:4, :4])


def test_do_age_total_effect_only_moves_findings_whose_rate_depends_on_age():
    # without the max_findings cap, which lets a new finding crowd out another (also a causal path)
    config = PhantomConfig(attributes=True, max_findings=len(CONFIG.prevalence))
    unaffected = [f for f in config.prevalence if f not in AGE_PREVALENCE_SLOPE]
    moved = 0
    for phantom in make_phantoms(80, 20_999, config):
        for age in (21.0, 89.0):
            other = do_attribute(phantom, config, age=age)
            assert other.attributes["sex"] == phantom.attributes["sex"]
            for finding in unaffected:  # neither added nor removed, same severity and placement
                assert (finding in other.findings_meta) == (finding in phantom.findings_meta)
                if finding in phantom.findings_meta:
                    assert other.findings_meta[finding] == phantom.findings_meta[finding]
            moved += set(other.findings_meta) != set(phantom.findings_meta)
    assert moved > 0  # age is a cause of some findings


def test_do_sex_keeps_age_and_findings_whose_rate_ignores_sex():
    config = PhantomConfig(attributes=True, max_findings=len(CONFIG.prevalence))  # no cap (see above)
    for phantom in make_phantoms(30, 20_999, config):
        flipped = "male" if phantom.attributes["sex"] == "female" else "female"
        other = do_attribute(phantom, config, sex=flipped)
        assert other.attributes == {"age": phantom.attributes["age"], "sex": flipped}
        for finding in (f for f in config.prevalence if f not in SEX_PREVALENCE_SLOPE):
            assert (finding in other.findings_meta) == (finding in phantom.findings_meta)


def test_older_patients_have_more_cardiomegaly():
    phantoms = _phantoms(400)
    ages = np.array([p.attributes["age"] for p in phantoms])
    has = np.array(["Cardiomegaly" in p.findings_meta for p in phantoms])
    assert has[ages > 65].mean() > has[ages < 45].mean()


def test_without_finding_keeps_the_attributes():
    phantom = next(p for p in _phantoms(40) if p.findings_meta)
    finding = sorted(phantom.findings_meta)[0]
    assert without_finding(phantom, finding, CONFIG).attributes == phantom.attributes


def test_cli_phantoms_attributes_flag_records_them(tmp_path):
    from typer.testing import CliRunner

    from cyclex.cli import app
    from cyclex.datasets.phantom import read_phantom_folder

    result = CliRunner().invoke(app, ["phantoms", "--n", "3", "--seed", "20999", "--attributes", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    records = read_phantom_folder(tmp_path / "p")
    assert all(set(r["attributes"]) == {"age", "sex"} for r in records)
    plain = CliRunner().invoke(app, ["phantoms", "--n", "2", "--seed", "20999", "--out", str(tmp_path / "q")])
    assert plain.exit_code == 0 and all("attributes" not in r for r in read_phantom_folder(tmp_path / "q"))


def test_cli_train_causal_refuses_phantoms_without_attributes(tmp_path):
    from typer.testing import CliRunner

    from cyclex.cli import app

    CliRunner().invoke(app, ["phantoms", "--n", "2", "--seed", "20999", "--out", str(tmp_path / "q")])
    result = CliRunner().invoke(app, ["train-causal", "--images", str(tmp_path / "q"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "attributes" in result.output
