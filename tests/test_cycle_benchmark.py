"""benchmarks/cycle.py helpers on a hand-made run folder."""

import json

import cv2
import numpy as np


def _item(run, name, mask, positive, verified, finding="Cardiomegaly"):
    folder = run / "items" / name
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "mask.png"), mask.astype(np.uint8) * 255)
    np.save(folder / "positive.npy", positive.astype(np.float32))
    return {"image_id": name, "finding": finding, "verified": verified, "mask_png": f"items/{name}/mask.png",
            "positive_npy": f"items/{name}/positive.npy"}


def test_pixel_aucs_all_items_and_verified_only(tmp_path):
    from benchmarks.cycle import pixel_aucs

    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    lines = [
        _item(tmp_path, "a", mask, mask * 1.0, verified=True),  # the map is the mask: AUC 1
        _item(tmp_path, "b", mask, 1.0 - mask, verified=False),  # the map avoids the mask: AUC 0
        {"image_id": "c", "finding": "Cardiomegaly", "verified": True, "mask_png": None},  # no truth: skipped
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert pixel_aucs(tmp_path, {}) == {"Cardiomegaly": [1.0, 0.0]}
    assert pixel_aucs(tmp_path, {}, verified_only=True) == {"Cardiomegaly": [1.0]}
    # a chest box restricts the pixels compared, not the ranking
    assert pixel_aucs(tmp_path, {"b": [0, 0, 6, 6]}) == {"Cardiomegaly": [1.0, 0.0]}


def test_pixel_aucs_raw_reads_the_signed_map(tmp_path):
    from benchmarks.cycle import pixel_aucs

    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    line = _item(tmp_path, "a", mask, 1.0 - mask, verified=True)  # the saved map avoids the mask: AUC 0
    # the signed map is +1 on the mask and -1 elsewhere: its positive part is the mask, AUC 1
    np.save(tmp_path / "items" / "a" / "signed.npy", np.where(mask, 1.0, -1.0).astype(np.float32))
    line["signed_npy"] = "items/a/signed.npy"
    (tmp_path / "results.jsonl").write_text(json.dumps(line) + "\n")
    assert pixel_aucs(tmp_path, {}) == {"Cardiomegaly": [0.0]}
    assert pixel_aucs(tmp_path, {}, raw=True) == {"Cardiomegaly": [1.0]}


def test_ceiling_is_the_exact_counterfactual_and_noise_caps_the_raw_map(tmp_path):
    from dataclasses import replace

    from benchmarks.cycle import ceiling_aucs
    from cyclex.datasets.phantom import PhantomConfig, make_phantom

    def ceiling(config):
        phantom = make_phantom(5, config, {"Lung Lesion": {"severity": "severe"}}, phantom_id="p")
        line = {"image_id": "p", "finding": "Lung Lesion", "verified": True, "mask_png": "unused.png"}
        (tmp_path / "results.jsonl").write_text(json.dumps(line) + "\n")
        return ceiling_aucs(tmp_path, {"p": phantom}, config, map_blur=5)

    noiseless = ceiling(PhantomConfig(noise_std=0.0))
    # no noise: the lesion (it brightens) is all I - CF holds, up to 8-bit rounding of the query
    assert noiseless["raw"] > 0.97 and noiseless["smoothed"] > 0.97
    noisy = ceiling(replace(PhantomConfig(), noise_std=0.03))
    # the query's noise lights up max(I - CF, 0) everywhere; the 5 x 5 blur averages most of it out
    assert noisy["raw"] < noiseless["raw"] - 0.05
    assert noisy["smoothed"] > noisy["raw"] + 0.05


def test_held_out_queries_keep_chest_boxes_apart_and_the_truth(tmp_path):
    from benchmarks.cycle import held_out_queries
    from cyclex.demo.queries import demo_query_phantoms

    records, chest_boxes, (phantoms, config) = held_out_queries(3, 11, tmp_path / "phantoms")
    expected = demo_query_phantoms(3, seed=11)
    assert [r["id"] for r in records] == [p.id for p in expected] == list(phantoms)
    assert all("chest_box" not in r for r in records)  # frames on the whole image
    assert chest_boxes == {p.id: list(p.chest_box) for p in expected}
    assert [r["alignment_chest_box"] for r in records] == [list(p.chest_box) for p in expected]  # for evaluate
    assert config.mask_min_change > 0 and config.shortcut is not None


def test_mass_outside_chest_box_and_rates_with_intervals(tmp_path):
    from benchmarks.cycle import _rate, bootstrap_mean_ci, mass_outside_chest_box

    mask = np.zeros((8, 8), bool)
    heat = np.zeros((8, 8))
    heat[0, 0], heat[4, 4] = 1.0, 3.0  # a quarter of the mass outside the box (2, 2, 8, 8)
    line = _item(tmp_path, "a", mask, heat, verified=True)
    np.save(tmp_path / "items" / "a" / "signed.npy", np.where(heat > 0, heat, -1.0).astype(np.float32))
    line["signed_npy"] = "items/a/signed.npy"
    (tmp_path / "results.jsonl").write_text(json.dumps(line) + "\n")
    shares = mass_outside_chest_box(tmp_path, {"a": [2, 2, 8, 8]})
    assert shares == {"raw": [0.25], "smoothed": [0.25]}
    assert mass_outside_chest_box(tmp_path, {}) == {"raw": [], "smoothed": []}  # no box, no share
    rate = _rate(8, 10)
    assert rate["rate"] == 0.8 and rate["ci95"][0] < 0.8 < rate["ci95"][1]
    assert _rate(0, 0)["rate"] is None and bootstrap_mean_ci([]) is None
    low, high = bootstrap_mean_ci([0.5, 0.7, 0.9])
    assert 0.5 <= low < 0.7 < high <= 0.9
