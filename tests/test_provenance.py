"""Provenance: what made a number is written into every run, its page and its evaluation (issue 16, item 3)."""

from __future__ import annotations

import json

import numpy as np
import torch
from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_generator, query
from PIL import Image

from cyclex import provenance
from cyclex.cycle import CyclicExplainer
from cyclex.cycle import run_folder as rf
from cyclex.cycle.report_html import write_run_report


def test_environment_names_versions_commit_device_and_date():
    env = provenance.environment()
    assert env["cyclex_version"] and env["date"].endswith("Z") and env["device"].startswith("cpu")
    assert {"torch", "diffusers", "transformers", "python"} <= set(env["versions"])
    assert env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert isinstance(env["git_commit"], str) and env["git_commit"]


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert provenance.git_commit(tmp_path) == {"commit": "unknown", "dirty": None}
    assert provenance.git_commit(tmp_path / "no" / "such" / "folder")["commit"] == "unknown"


def test_weights_fingerprints(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.safetensors").write_bytes(b"abc")
    (tmp_path / "model" / "config.json").write_text("{}")
    assert provenance.files_sha256([tmp_path / "model"], root=tmp_path) == {
        "model/w.safetensors": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    linear = torch.nn.Linear(2, 2)
    first = provenance.module_weights_sha256(linear)
    with torch.no_grad():
        linear.weight += 1
    assert provenance.module_weights_sha256(linear) != first
    described = provenance.describe_scorer(linear, "cpg_classifier")
    assert described["role"] == "cpg_classifier" and described["in_memory_weights_sha256"]
    tagged = type("Tagged", (), {"provenance": {"name": "phantom", "roles": {"clip_encoder": {"name": "stand-in"}}}})()
    assert provenance.describe_scorer(tagged, "clip_encoder")["name"] == "stand-in"
    assert provenance.describe_scorer(tagged, "cpg_classifier")["name"] == "phantom"


def test_frame_threshold_rule_names_the_fallback():
    rule = provenance.frame_threshold_rule({"Cardiomegaly": 90}, findings=["Cardiomegaly", "Edema"])
    assert "Cardiomegaly 90" in rule and "L = 95: Edema" in rule
    assert "stable" in provenance.frame_threshold_rule("stable") and "fixed L = 80" in provenance.frame_threshold_rule(80)


def test_run_summary_and_page_record_provenance(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.uint8(query(0.9, 0.1, 0.1)[0].numpy() * 255 + 0.5)).save(path)
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker(), frame_threshold=95,
                                 frame_normalize=False)  # the paper's scale: the rule names no stretch
    out = tmp_path / "run"
    rf.run_explainer(explainer, [{"id": "a", "image": str(path)}], out, progress=False,
                     run_settings={"labeler": "keywords"})
    stored = json.loads((out / "summary.json").read_text())["provenance"]
    assert stored["cyclex_version"] == provenance.cyclex_version()
    assert stored["git_commit"] and {"torch", "diffusers", "transformers"} <= set(stored["versions"])
    assert stored["scorers"]["labeler"]["name"] == "keywords"
    assert stored["scorers"]["frame_threshold"]["rule"] == "fixed L = 95 on 0-255"
    page = write_run_report(out, mentions=None).read_text()
    assert 'id="provenance"' in page and "fixed L = 95 on 0-255" in page and stored["git_commit"] in page
