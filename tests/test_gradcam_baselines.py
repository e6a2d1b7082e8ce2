"""`--baseline gradcam`: Grad-CAM maps written into run folders and shown on the run and audit pages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cyclex.cli import app


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_generator, query
    from PIL import Image

    from cyclex.cycle import CyclicExplainer
    from cyclex.cycle.run_folder import run_explainer

    root = tmp_path_factory.mktemp("baselines")
    records = []
    for index, values in enumerate([(0.9, 0.9, 0.1), (0.9, 0.1, 0.9)]):
        path = root / f"q{index}.png"
        Image.fromarray(np.uint8(query(*values)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": f"q{index}", "image": str(path), "chest_box": [0, 0, 32, 32], "masks": {}})
    runs = {}
    for name in ("one", "two"):
        runs[name] = root / name
        run_explainer(CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker(), frame_threshold=95),
                      records, runs[name], batch_size=2, progress=False)
    return runs


@pytest.fixture(scope="module")
def vit_generator(tmp_path_factory):
    from cyclex.adapters.hf import HFImageToTextGenerator
    from cyclex.demo.generators import (
        DemoGeneratorConfig,
        build_demo_model,
        demo_image_processor,
        train_report_tokenizer,
    )

    torch.manual_seed(0)
    tokenizer = train_report_tokenizer(["cardiomegaly, effusion", "edema", "possible cardiomegaly"] * 4, vocab_size=290)
    config = DemoGeneratorConfig(image_size=32, patch_size=8, encoder_hidden=32, encoder_layers=1, decoder_hidden=32,
                                 decoder_layers=1, heads=2)
    model = build_demo_model(config, tokenizer, max_report_tokens=16)
    folder = tmp_path_factory.mktemp("baseline_vit")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    demo_image_processor(32).save_pretrained(folder)
    return HFImageToTextGenerator.from_pretrained(folder, device="cpu")


def test_audit_with_gradcam_baseline_writes_and_shows_the_maps(two_runs, vit_generator, tmp_path):
    from cyclex.cycle.audit_baselines import BASELINES_JSON, GRADCAM_NPY, GRADCAM_PNG
    from cyclex.cycle.audit_report import audit_runs
    from cyclex.cycle.report_html import write_run_report
    from cyclex.cycle.run_folder import read_results

    audit = audit_runs(two_runs, tmp_path / "audit", baseline="gradcam",
                       generators={"one": vit_generator, "two": vit_generator})
    for run in two_runs.values():
        record = json.loads((run / BASELINES_JSON).read_text())
        assert record["method"] == "gradcam" and record["n_items"] == len(read_results(run))
        assert record["target_layer"].endswith("layernorm_before")
        for line in read_results(run):
            folder = (run / line["query_png"]).parent
            cam = np.load(folder / GRADCAM_NPY)
            assert cam.shape == (32, 32) and np.isfinite(cam).all() and 0 <= cam.min() and cam.max() <= 1
            assert (folder / GRADCAM_PNG).is_file()
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "Grad-CAM baseline" in page and GRADCAM_PNG in page
    run_page = write_run_report(two_runs["one"]).read_text()
    assert run_page.count(GRADCAM_PNG) >= len(read_results(two_runs["one"]))
    assert audit["names"] == ["one", "two"]


def test_pages_without_a_baseline_show_none(tmp_path, two_runs):
    from cyclex.cycle.audit_report import audit_runs

    fresh = {}
    for name, run in two_runs.items():  # copies that never had a baseline
        fresh[name] = tmp_path / name
        shutil.copytree(run, fresh[name], ignore=shutil.ignore_patterns("gradcam.*", "baselines.json"))
    audit_runs(fresh, tmp_path / "audit")
    assert "Grad-CAM" not in (tmp_path / "audit" / "audit.html").read_text()


def test_cli_baseline_refuses_unknown_and_specless_runs(two_runs, tmp_path):
    unknown = CliRunner().invoke(app, ["audit", str(two_runs["one"]), str(two_runs["two"]), "--out", str(tmp_path / "a"),
                                       "--baseline", "lime"])
    assert unknown.exit_code == 1 and "baseline must be one of gradcam, got 'lime'" in unknown.output
    # the fake runs record no loadable generator spec: the baseline cannot rebuild their generator
    report = CliRunner().invoke(app, ["report", str(two_runs["one"]), "--baseline", "gradcam"])
    assert report.exit_code == 1 and "generator" in report.output
