"""What a new user meets on the command line (issue 17): messages that name flags, a search that says
how many counterfactuals it accepted, refusals before any model is loaded, the demo's tailored SDs by
name, and a warning when the tailored SD was trained on another generator."""

from __future__ import annotations

import json

import pytest
import torch
from cycle_fakes import query
from PIL import Image
from test_search_maker import STEPS, tiny_tailored
from typer.testing import CliRunner

from cyclex.cli import app


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def _queries(folder, hearts=(("a", 0.9),)):
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, heart in hearts:
        Image.fromarray((query(heart=heart)[0].numpy() * 255).astype("uint8")).save(folder / f"{image_id}.png")
    return folder


def test_explain_help_names_train_tailored_and_the_spec_options():
    result = CliRunner().invoke(app, ["explain", "--help"], env={"COLUMNS": "400"})
    text = _flat(result.output)
    assert result.exit_code == 0 and "train-tailored" in text and "train-sd" not in text
    assert "demo:clean" in text and "max_new_tokens" in text and "threshold" in text


def test_messages_name_the_flags_not_python_arguments(tmp_path):
    images = _queries(tmp_path / "in")
    tailored = tiny_tailored(tmp_path / "sd", best_l1="checkpoint-000002")
    base = ["explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
            "--images", str(images), "--out", str(tmp_path / "run"), "--labeler", "python:cycle_fakes:KeywordLabeler"]
    steps = CliRunner().invoke(app, [*base, "--steps", "0"])
    assert steps.exit_code == 1 and "--steps must be >= 1" in _flat(steps.output)
    assert "ExplainSettings" not in steps.output
    # the LPIPS backbone is missing: the user is told the flag, not LPIPSMetric's keyword
    lpips = CliRunner().invoke(app, [*base, "--variant", "nti", "--search", "--classifier", "none", "--encoder", "none",
                                     "--lpips", f"alex:{tmp_path / 'missing.pth'}"])
    text = _flat(lpips.output)
    assert lpips.exit_code == 1 and "missing.pth" in text
    assert "backbone_weights" not in text and "random_backbone" not in text and "--lpips alex:PATH" in text
    train = CliRunner().invoke(app, ["train-tailored", "--generator", "python:cycle_fakes:brightness_reports",
                                     "--images", str(images), "--base", str(tailored), "--out", str(tmp_path / "t"),
                                     "--max-steps", "0"])
    assert train.exit_code == 2 and "--max-steps must be a positive integer" in _flat(train.output)


def test_a_maker_that_cannot_be_searched_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import cyclex.specs.generators
    import cyclex.specs.scorers

    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(cyclex.specs.generators, "load_generator", loading)
    monkeypatch.setattr(cyclex.specs.scorers, "search_scorer_from_specs", loading)
    base = ["explain", "--generator", "hf:/models/gen", "--tailored", str(tmp_path / "sd"), "--images",
            str(tmp_path), "--out", str(tmp_path / "run"), "--search"]
    rse = CliRunner().invoke(app, [*base, "--variant", "rse"])
    text = _flat(rse.output)
    assert rse.exit_code == 1 and "--search cannot search --variant rse" in text and "nti" in text
    unknown = CliRunner().invoke(app, [*base, "--variant", "fancy"])
    assert unknown.exit_code == 1 and "--variant: unknown counterfactual variant 'fancy'" in _flat(unknown.output)
    reconstruction = CliRunner().invoke(app, [*base, "--variant", "nti", "--difference-reference", "reconstruction"])
    assert reconstruction.exit_code == 1 and "--difference-reference query with --search" in _flat(reconstruction.output)


def test_search_states_accepted_of_attempted_and_the_page_marks_the_rest(tmp_path):
    from cyclex.demo.phantom_classifier import (
        PhantomClassifier,
        PhantomClassifierConfig,
        PhantomClassifierNet,
    )
    from cyclex.explain.cf_threshold_calibration import save_cf_thresholds
    from cyclex.explain.scores import CFThresholds

    torch.manual_seed(0)
    images = _queries(tmp_path / "in", (("a", 0.9), ("c", 0.95)))
    tailored = tiny_tailored(tmp_path / "sd", best_l1="checkpoint-000002")
    config = PhantomClassifierConfig(channels=(8, 16))
    PhantomClassifier(PhantomClassifierNet(config), config).save_pretrained(tmp_path / "clf")
    # no counterfactual can pass an LPIPS distance below 0: the search accepts none
    thresholds = save_cf_thresholds(tmp_path / "t.json", CFThresholds(lpips=-1.0, clip=-2, l2=1e9, cpg=-1e9, fet=-1e9),
                                    {"procedure": "test"})
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
        "--images", str(images), "--out", str(out), "--steps", str(STEPS), "--labeler",
        "python:cycle_fakes:KeywordLabeler", "--variant", "nti", "--search", "--classifier", f"phantom:{tmp_path / 'clf'}",
        "--encoder", "classifier", "--lpips", "stand-in", "--thresholds", str(thresholds), "--search-strengths", "1.0",
        "--search-guidances", "7", "--null-settings", "underfit", "--search-checkpoints", "best_l2"])
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    # the user saw a Cyclic Rate while search_ablation.json said nothing was accepted
    assert "search: 0/2 counterfactuals accepted" in text and "the other 2 are the best candidate" in text
    page = (out / "index.html").read_text()
    assert page.count("search: not accepted") == 2


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLEX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_tailored_demo_shorthand_and_the_other_generator_warning(tmp_path, fresh_home):
    images = tmp_path / "in"
    images.mkdir()
    from cyclex.demo.queries import demo_query_phantoms

    Image.fromarray((demo_query_phantoms(1)[0].image * 255).astype("uint8")).save(images / "q.png")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", "demo:clean",
        "--images", str(images), "--out", str(out), "--steps", "1", "--labeler", "python:cycle_fakes:KeywordLabeler"])
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert "warning: the tailored SD" in text and "was trained on the reports of demo:clean, not of" in text
    assert "cyclex train-tailored --generator python:cycle_fakes:brightness_reports" in text
    config = json.loads((out / "run_config.json").read_text())
    assert config["tailored"] == str((fresh_home / "demo" / "tailored" / "clean").resolve())
    same = CliRunner().invoke(app, [
        "explain", "--generator", "demo:clean::batch_size=8", "--tailored", "demo:clean", "--images", str(images),
        "--out", str(tmp_path / "run2"), "--steps", "1"])
    assert same.exit_code == 0, same.output
    assert "warning" not in same.output  # its own generator (spec options aside)
