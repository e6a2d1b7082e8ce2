"""scripts/calibrate_cf_thresholds.py: thresholds for an encoder that is not CLIP (issue 16, item 4)."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_calibrated_file_makes_the_clip_criterion_applicable(tmp_path):
    import calibrate_cf_thresholds as script

    from cyclex.datasets.phantom import make_phantom, to_uint8
    from cyclex.demo.phantom_classifier import (
        PhantomClassifier,
        PhantomClassifierConfig,
        PhantomClassifierNet,
    )
    from cyclex.specs.scorers import load_scorers

    torch.manual_seed(0)
    config = PhantomClassifierConfig(channels=(8, 16))
    PhantomClassifier(PhantomClassifierNet(config), config).save_pretrained(tmp_path / "clf")
    rows = ["factual,counterfactual,finding"]
    for seed in range(3):
        with_it = make_phantom(seed, findings={"Cardiomegaly": {"severity": "moderate"}})
        without = make_phantom(seed, findings={})
        for name, phantom in (("f", with_it), ("c", without)):
            Image.fromarray(to_uint8(phantom.image)).save(tmp_path / f"{name}{seed}.png")
        rows.append(f"f{seed}.png,c{seed}.png,Cardiomegaly")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    specs = ["--classifier", f"phantom:{tmp_path / 'clf'}", "--encoder", "classifier", "--lpips", "stand-in"]
    out = script.main(["--pairs", str(tmp_path / "pairs.csv"), *specs, "--out", str(tmp_path / "t.json")])
    stored = json.loads(out.read_text())
    assert stored["provenance"]["n_pairs"] == 3 and stored["provenance"]["pairs_sha256"]
    assert stored["provenance"]["scorers"]["clip_encoder"]["kind"] == "stand-in"
    assert np.isfinite(list(stored["thresholds"].values())).all()
    table2 = load_scorers(*specs[1::2], demo=False)
    assert table2.not_applicable == ("lpips", "clip", "fet")  # Table 2 belongs to CLIP and real LPIPS
    calibrated = load_scorers(*specs[1::2], thresholds=out, demo=False)
    assert calibrated.not_applicable == () and calibrated.thresholds_source["sha256"]
