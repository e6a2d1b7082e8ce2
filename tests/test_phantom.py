"""The phantom world: determinism, sizes, exact masks (half-grey-level changes), visibility, reports vs labels, folders, CLI."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.datasets.phantom import (
    PhantomConfig,
    ShortcutConfig,
    make_phantom,
    make_phantoms,
    phantom_seed,
    read_phantom_folder,
    to_uint8,
    without_finding,
    write_phantom_folder,
)
from cyclex.datasets.phantom_findings import DRAWABLE
from cyclex.datasets.phantom_reports import CANONICAL_NORMAL_REPORT
from cyclex.findings import ABNORMALITIES, FINDINGS, NO_FINDING, LabelState, UnknownFindingError

FORCED_OPTIONS = {f: ({} if f == "Support Devices" else {"severity": "mild"}) for f in DRAWABLE}


def _same_phantom(a, b) -> None:
    assert np.array_equal(a.image, b.image)
    assert a.report == b.report and a.labels == b.labels and a.chest_box == b.chest_box
    assert a.findings_meta == b.findings_meta and a.shortcut == b.shortcut
    assert sorted(a.masks) == sorted(b.masks)
    for name in a.masks:
        assert np.array_equal(a.masks[name], b.masks[name])


def test_same_seed_same_phantom_and_different_seeds_differ():
    _same_phantom(make_phantom(5), make_phantom(5))
    first, second = make_phantoms(6, seed=3), make_phantoms(6, seed=3)
    for a, b in zip(first, second, strict=True):
        _same_phantom(a, b)
    # make_phantoms is make_phantom over derived seeds; sets of different seeds do not overlap.
    _same_phantom(replace(make_phantom(phantom_seed(3, 4)), id=first[4].id), first[4])
    assert len({p.id for p in first}) == 6
    other = make_phantoms(6, seed=4)
    assert not any(np.array_equal(a.image, b.image) for a in first for b in other)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_sizes_ranges_and_chest_box(size):
    config = PhantomConfig(size=size)
    phantom = make_phantom(11, config, {"Cardiomegaly": {}, "Pleural Effusion": {"side": "bilateral"}})
    assert phantom.image.shape == (size, size) and phantom.image.dtype == np.float32
    assert 0.0 <= phantom.image.min() and phantom.image.max() <= 1.0
    x0, y0, x1, y1 = phantom.chest_box
    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
    assert (x1 - x0) > size / 2 and (y1 - y0) > size / 3  # the lungs fill most of the film
    for mask in phantom.masks.values():
        assert mask.shape == (size, size) and mask.dtype == bool and mask.any()
    # The lungs are dark and the mediastinum bright: the anatomy looks like a chest film.
    row = y0 + (y1 - y0) * 2 // 5
    lung = np.median(phantom.image[row - 1: row + 2, x0 + (x1 - x0) // 8: x0 + (x1 - x0) // 4])
    spine = np.median(phantom.image[row - 1: row + 2, size // 2 - 1: size // 2 + 2])
    assert spine - lung > 0.2


@pytest.mark.parametrize("finding", DRAWABLE)
def test_mask_is_exactly_where_the_finding_changes_the_image(finding):
    for seed in (1, 2):
        other = "Support Devices" if finding != "Support Devices" else "Lung Lesion"
        forced = {finding: FORCED_OPTIONS[finding], other: {}}
        with_it = make_phantom(seed, findings=forced)
        without = make_phantom(seed, findings={other: {}})
        mask = with_it.masks[finding]
        change = np.abs(with_it.image - without.image)
        # Outside the mask: under half a grey level, so the 8-bit images differ by one level at most.
        assert change[~mask].max() < 0.5 / 255, f"{finding}: pixels outside the mask changed"
        assert np.abs(to_uint8(with_it.image).astype(int) - to_uint8(without.image))[~mask].max() <= 1
        assert (change[mask] >= 0.5 / 255).mean() > 0.9, f"{finding}: most mask pixels should change"
        # Visible at 64 px: a real area, and a clear mean change inside the mask.
        assert mask.sum() >= 20
        assert np.abs(with_it.image - without.image)[mask].mean() > 0.04
        # Removing the finding leaves the other finding's mask as it was, up to pixels at the
        # half-grey-level edge (the exposure curve is not linear, so a change there can cross it).
        flipped = with_it.masks[other] ^ without.masks[other]
        assert flipped.sum() <= 0.05 * (with_it.masks[other] | without.masks[other]).sum()


def test_mask_min_change_drops_only_the_invisible_blur_tails():
    seed, forced = 3, {"Cardiomegaly": {"severity": "moderate"}, "Lung Lesion": {}}
    exact = make_phantom(seed, PhantomConfig(noise_std=0.0, mask_min_change=0.0), forced)
    visible = make_phantom(seed, PhantomConfig(noise_std=0.0), forced)
    without = make_phantom(seed, PhantomConfig(noise_std=0.0), {"Lung Lesion": {}})
    change = np.abs(exact.image - without.image)
    exact_mask, visible_mask = exact.masks["Cardiomegaly"], visible.masks["Cardiomegaly"]
    # 0 keeps every pixel that changes at all; the default drops those changing by under half a level.
    assert not (change > 0)[~exact_mask].any()
    assert 0 < visible_mask.sum() < exact_mask.sum()
    assert not (visible_mask & ~exact_mask).any()
    assert change[exact_mask & ~visible_mask].max() < 0.5 / 255
    assert change[visible_mask].min() >= 0.5 / 255 - 1e-7
    with pytest.raises(ValueError, match="mask_min_change"):
        PhantomConfig(mask_min_change=-0.1)


def test_without_finding_is_the_same_patient_minus_that_finding():
    phantom = make_phantom(8, findings={"Cardiomegaly": {"severity": "severe"}, "Lung Lesion": {}})
    cf = without_finding(phantom, "Cardiomegaly")
    assert sorted(cf.masks) == ["Lung Lesion"]
    outside = ~phantom.masks["Cardiomegaly"]
    assert np.abs(cf.image[outside] - phantom.image[outside]).max() < 0.5 / 255
    with pytest.raises(ValueError, match="has no"):
        without_finding(phantom, "Edema")
    big = make_phantom(8, PhantomConfig(size=128), {"Lung Lesion": {}})
    assert without_finding(big, "Lung Lesion").image.shape == (128, 128)
    with pytest.raises(ValueError, match="size"):
        without_finding(big, "Lung Lesion", PhantomConfig())


def test_cardiomegaly_mask_is_added_heart_area_next_to_the_normal_heart():
    config = PhantomConfig(noise_std=0.0)
    normal = make_phantom(21, config, {})
    big = make_phantom(21, config, {"Cardiomegaly": {"severity": "severe"}})
    mask = big.masks["Cardiomegaly"]
    # The added area became brighter (heart density replaces lung) and lies on the image right half
    # mostly (the heart grows to the patient's left).
    assert (big.image[mask] - normal.image[mask]).mean() > 0.1
    xs = np.nonzero(mask)[1]
    assert np.mean(xs > 64 / 2) > 0.6


def test_nodule_radius_and_severity_scale():
    small = make_phantom(4, findings={"Lung Lesion": {"severity": "mild"}}).masks["Lung Lesion"]
    large = make_phantom(4, findings={"Lung Lesion": {"severity": "severe"}}).masks["Lung Lesion"]
    assert small.sum() >= np.pi * 3 ** 2 * 0.8  # radius >= 3 px at 64 px
    assert large.sum() > small.sum()


def test_effusion_side_follows_the_patient_not_the_image():
    left = make_phantom(6, findings={"Pleural Effusion": {"side": "left", "severity": "moderate"}})
    right = make_phantom(6, findings={"Pleural Effusion": {"side": "right", "severity": "moderate"}})
    # The patient's left is the image right on a PA film; fluid lies in the lower half.
    ys_l, xs_l = np.nonzero(left.masks["Pleural Effusion"])
    ys_r, xs_r = np.nonzero(right.masks["Pleural Effusion"])
    assert xs_l.mean() > 32 > xs_r.mean()
    assert ys_l.mean() > 32 and ys_r.mean() > 32
    assert "left" in left.report and "right" in right.report


def test_noise_is_small_and_image_reconstructable():
    noisy = make_phantom(9)
    clean = make_phantom(9, PhantomConfig(noise_std=0.0))
    residual = noisy.image - clean.image
    assert 0.01 < residual.std() < 0.02
    psnr = 10 * np.log10(1.0 / np.mean(residual ** 2))
    assert psnr > 30


def test_labels_follow_the_drawn_findings_and_the_report():
    phantoms = make_phantoms(150, seed=2)
    for p in phantoms:
        present = set(p.labels.present(uncertain_as_present=True))
        assert present == set(p.findings_meta), p.report
        for finding, meta in p.findings_meta.items():
            expected = LabelState.UNCERTAIN if meta["uncertain"] else LabelState.POSITIVE
            assert p.labels[finding] is expected
            if meta["uncertain"]:
                assert meta["severity"] == "mild"
        assert set(p.masks) == set(p.findings_meta)
        no_finding = not (present - {"Support Devices"})
        assert (p.labels[NO_FINDING] is LabelState.POSITIVE) == no_finding
        for finding in ABNORMALITIES:
            if p.labels[finding] is LabelState.NEGATIVE:
                assert finding not in p.findings_meta
        assert p.report.strip() and p.report.endswith(".")
    counts = Counter(len(p.findings_meta) for p in phantoms)
    assert max(counts) <= 3
    assert 0.15 <= counts[0] / len(phantoms) <= 0.35
    hedged = sum(m["uncertain"] for p in phantoms for m in p.findings_meta.values())
    all_findings = sum(len(p.findings_meta) for p in phantoms)
    assert 0 < hedged < 0.25 * all_findings
    reports = " ".join(p.report for p in phantoms)
    for phrase in ("No pleural effusion", "Heart size is normal.", "Lungs are clear.",
                   "No acute cardiopulmonary", "Possible"):
        assert phrase in reports


def test_prevalence_of_each_finding():
    phantoms = make_phantoms(300, seed=5)
    counts = Counter(f for p in phantoms for f in p.findings_meta)
    for finding in DRAWABLE:
        assert 0.05 <= counts[finding] / len(phantoms) <= 0.3, (finding, counts[finding])
    only_effusion = make_phantoms(40, seed=6, config=PhantomConfig(prevalence={"Pleural Effusion": 1.0},
                                                                    normal_rate=None))
    assert all(list(p.findings_meta) == ["Pleural Effusion"] for p in only_effusion)


def test_canonical_reports_are_fixed_sentences():
    config = PhantomConfig(report_style="canonical")
    normal = make_phantom(3, config, {})
    assert normal.report == CANONICAL_NORMAL_REPORT
    p = make_phantom(3, config, {"Cardiomegaly": {"severity": "mild", "uncertain": True},
                                 "Pleural Effusion": {"side": "left"}})
    assert p.report == "The heart is enlarged. There is a left pleural effusion."
    assert p.labels["Cardiomegaly"] is LabelState.POSITIVE  # canonical never hedges
    assert p.findings_meta["Cardiomegaly"]["uncertain"] is False
    assert all(p.labels[f] is LabelState.BLANK for f in ABNORMALITIES if f not in p.findings_meta)


def test_varied_uncertain_wording():
    p = make_phantom(12, findings={"Pleural Effusion": {"severity": "mild", "side": "left", "uncertain": True}})
    assert p.labels["Pleural Effusion"] is LabelState.UNCERTAIN
    assert "Possible small left" in p.report


def test_rule_labeler_reproduces_ground_truth_labels():
    from cyclex.labelers import RuleLabeler

    phantoms = make_phantoms(200, seed=7)
    predicted = RuleLabeler().label([p.report for p in phantoms])
    for finding in FINDINGS:
        agree = np.mean([p.labels[finding] is q[finding] for p, q in zip(phantoms, predicted, strict=True)])
        assert agree >= 0.95, (finding, agree)
    canonical = make_phantoms(60, seed=8, config=PhantomConfig(report_style="canonical"))
    predicted = RuleLabeler().label([p.report for p in canonical])
    assert all(p.labels.present() == q.present() for p, q in zip(canonical, predicted, strict=True))


def test_shortcut_marker_rates_mask_and_pixels():
    shortcut = ShortcutConfig(finding="Cardiomegaly", rate_with_finding=0.8, rate_without_finding=0.0,
                              box=(0.1, 0.8, 0.1, 0.1), intensity=1.0)
    config = PhantomConfig(shortcut=shortcut, prevalence={"Cardiomegaly": 0.5, "Lung Lesion": 0.3})
    phantoms = make_phantoms(120, seed=9, config=config)
    with_finding = [p for p in phantoms if "Cardiomegaly" in p.findings_meta]
    without = [p for p in phantoms if "Cardiomegaly" not in p.findings_meta]
    rate = np.mean([p.shortcut for p in with_finding])
    assert 0.65 <= rate <= 0.95 and not any(p.shortcut for p in without)
    marked = next(p for p in with_finding if p.shortcut)
    assert marked.shortcut_box == (6, 51, 13, 58)
    assert marked.shortcut_mask.sum() == 49 and marked.shortcut_mask[51:58, 6:13].all()
    assert marked.image[marked.shortcut_mask].mean() > 0.97
    for mask in marked.masks.values():
        assert not (mask & marked.shortcut_mask).any()
    # Forcing the marker on a normal phantom changes only the marker's pixels.
    plain = make_phantom(30, config, {}, shortcut=False)
    forced = make_phantom(30, config, {}, shortcut=True)
    assert forced.shortcut and not plain.shortcut
    assert np.array_equal((forced.image != plain.image), forced.shortcut_mask & (forced.image != plain.image))
    assert (forced.image != plain.image)[forced.shortcut_mask].mean() > 0.9


def test_shortcut_spec_parsing_and_validation():
    parsed = ShortcutConfig.parse("cardiomegaly:0.9:0.8,0.1,0.05,0.05")
    assert parsed.finding == "Cardiomegaly" and parsed.rate_with_finding == 0.9
    assert parsed.box == (0.8, 0.1, 0.05, 0.05)
    with pytest.raises(ValueError, match="FINDING:RATE"):
        ShortcutConfig.parse("Cardiomegaly")
    with pytest.raises(ValueError, match="box"):
        ShortcutConfig.parse("Cardiomegaly:0.5:0.9,0.9,0.2,0.2")
    with pytest.raises(UnknownFindingError):
        ShortcutConfig.parse("Heartache:0.5")
    with pytest.raises(ValueError, match="rate_with_finding"):
        ShortcutConfig(rate_with_finding=1.5)


def test_config_and_forced_findings_validation():
    with pytest.raises(ValueError, match="size"):
        PhantomConfig(size=16)
    with pytest.raises(ValueError, match="cannot be drawn"):
        PhantomConfig(prevalence={"Pneumonia": 0.2})
    with pytest.raises(ValueError, match="report_style"):
        PhantomConfig(report_style="poetic")
    with pytest.raises(ValueError, match="side"):
        make_phantom(1, findings={"Pneumothorax": {"side": "bilateral"}})
    with pytest.raises(ValueError, match="severity"):
        make_phantom(1, findings={"Edema": {"severity": "huge"}})
    with pytest.raises(ValueError, match="unknown keys"):
        make_phantom(1, findings={"Edema": {"colour": "red"}})
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1)
    with pytest.raises(ValueError, match="needs config.shortcut"):
        make_phantom(1, shortcut=True)


def test_folder_round_trip(tmp_path):
    config = PhantomConfig(shortcut=ShortcutConfig(rate_with_finding=1.0, rate_without_finding=1.0))
    phantoms = make_phantoms(4, seed=1, config=config)
    folder = write_phantom_folder(phantoms, tmp_path / "set")
    records = read_phantom_folder(folder)
    assert [r["id"] for r in records] == [p.id for p in phantoms]
    assert not list(folder.rglob("*.tmp"))
    for phantom, record in zip(phantoms, records, strict=True):
        image = cv2.imread(record["image"], cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and np.array_equal(image, to_uint8(phantom.image))
        assert record["report"] == phantom.report
        assert record["labels"] == phantom.labels.to_dict()
        assert record["chest_box"] == list(phantom.chest_box)
        assert record["shortcut"] is True and record["shortcut_box"] == list(phantom.shortcut_box)
        assert record["findings_meta"] == json.loads(json.dumps(phantom.findings_meta))
        assert set(record["masks"]) == set(phantom.masks)
        for finding, path in record["masks"].items():
            assert np.array_equal(cv2.imread(path, cv2.IMREAD_GRAYSCALE) > 127, phantom.masks[finding])
        assert np.array_equal(cv2.imread(record["shortcut_mask"], cv2.IMREAD_GRAYSCALE) > 127, phantom.shortcut_mask)
    duplicate = [phantoms[0], phantoms[0]]
    with pytest.raises(ValueError, match="share the id"):
        write_phantom_folder(duplicate, tmp_path / "dup")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_phantom_folder(tmp_path / "nothing")


def test_cli_phantoms(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["phantoms", "--n", "3", "--size", "64", "--seed", "2",
                                      "--shortcut", "Cardiomegaly:1.0:0.85,0.85,0.1,0.1", "--shortcut-without", "1.0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = read_phantom_folder(out)
    assert len(records) == 3 and all(r["shortcut"] for r in records)
    assert [r["id"] for r in records] == [p.id for p in make_phantoms(3, seed=2)]
    bad = CliRunner().invoke(app, ["phantoms", "--n", "1", "--shortcut", "Cardiomegaly", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "FINDING:RATE" in bad.output
