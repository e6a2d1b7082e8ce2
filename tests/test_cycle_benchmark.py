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
