"""Typed run settings (ExplainSettings, FrameSettings, SearchGrid): defaults, flat overrides, validation,
round trip through explain_settings.json."""

from __future__ import annotations

import json

import pytest

from cyclex.counterfactuals import search
from cyclex.cycle.explainer import CyclicExplainer
from cyclex.cycle.settings import ExplainSettings, FrameSettings, SearchGrid
from cyclex.explain.frames import DEFAULT_BLUR, DEFAULT_K


def test_frame_defaults_are_the_explainers():
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(CyclicExplainer.__init__).parameters.items()}
    kwargs = FrameSettings().explainer_kwargs()
    assert kwargs["frame_threshold"] == defaults["frame_threshold"] == "stable"
    assert kwargs["frame_k"] == defaults["frame_k"] == DEFAULT_K
    assert kwargs["map_blur"] == defaults["map_blur"] == DEFAULT_BLUR
    assert kwargs["frame_normalize"] is defaults["frame_normalize"] is True  # issue 17: defaults give a frame
    assert kwargs["frame_candidates"] == (85.0, 90.0, 95.0, 100.0, 105.0)


def test_flat_overrides_reach_the_right_component():
    settings = ExplainSettings().with_overrides(guidance=1.0, frame_threshold=95, frame_normalize=True, map_blur=1,
                                                search=True, search_kwargs={"required_score": 4})
    assert settings.guidance == 1.0 and settings.steps == 50
    assert settings.frames == FrameSettings(threshold=95, normalize=True, map_blur=1)
    assert settings.search.required_score == 4
    assert settings.search.guidances == tuple(float(g) for g in search.DEFAULT_GUIDANCES)
    assert settings.search.null_settings == tuple(search.DEFAULT_NULL_SETTINGS)
    assert settings.with_overrides(search=False).search is None
    with pytest.raises(TypeError, match="unknown explain settings \\['guidnace'\\]"):
        ExplainSettings().with_overrides(guidnace=2)
    with pytest.raises(TypeError, match="unknown search settings"):
        SearchGrid.from_kwargs({"strenghts": (1.0,)})
    with pytest.raises(ValueError, match="pass search=True"):
        ExplainSettings().with_overrides(search=False, search_kwargs={"required_score": 3})


@pytest.mark.parametrize("bad, message", [
    ({"strength": 0.0}, "strength"), ({"steps": 0}, "steps"), ({"difference_reference": "cf"}, "difference_reference"),
    ({"batch_size": 0}, "batch_size"), ({"guidance": -1}, "guidance"),
])
def test_explain_settings_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        ExplainSettings(**bad)


@pytest.mark.parametrize("bad, message", [
    ({"threshold": "otsu"}, "threshold"), ({"threshold": 300}, "threshold"), ({"blur": 4}, "odd"), ({"k": 0}, "k"),
])
def test_frame_settings_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        FrameSettings(**bad)


def test_per_finding_thresholds_are_kept():
    frames = FrameSettings(threshold={"Cardiomegaly": 80, "Edema": 101.5})
    assert frames.explainer_kwargs()["frame_threshold"] == {"Cardiomegaly": 80.0, "Edema": 101.5}
    with pytest.raises(ValueError, match="per finding"):
        FrameSettings(threshold={"Edema": 300})


def test_round_trip_through_json():
    settings = ExplainSettings(variant="nti", findings=("Cardiomegaly",), frames=FrameSettings(threshold=90.0),
                               search=SearchGrid(strengths=(1.0, 0.9), guidance_batch_size=1))
    again = ExplainSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings


def test_cli_and_three_lines_of_python_make_the_same_run(tmp_path):
    """`cyclex explain` builds an ExplainSettings; passing the same one from Python gives the same run."""
    import numpy as np
    from cycle_fakes import brightness_generator, query, write_tiny_tailored
    from PIL import Image
    from typer.testing import CliRunner

    from cyclex.cli import app
    from cyclex.cycle.run_folder import run_explain

    images = tmp_path / "in"
    images.mkdir()
    for image_id, heart in {"a": 0.9, "b": 0.8}.items():
        Image.fromarray(np.uint8(query(heart, 0.9)[0].numpy() * 255 + 0.5)).save(images / f"{image_id}.png")
    tailored = write_tiny_tailored(tmp_path / "sd")
    args = ["explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
            "--images", str(images), "--out", str(tmp_path / "cli"), "--steps", "2", "--guidance", "5",
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly", "--map-blur", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cli" / "explain_settings.json").read_text())
    settings = ExplainSettings.from_dict(saved)
    assert settings == ExplainSettings(steps=2, guidance=5.0, findings=("Cardiomegaly",), frames=FrameSettings(map_blur=3))

    from cycle_fakes import KeywordLabeler

    run_explain(brightness_generator(), tailored, str(images), tmp_path / "python", settings,
                labeler=KeywordLabeler(), progress=False)
    cli_lines = [json.loads(x) for x in (tmp_path / "cli" / "results.jsonl").read_text().splitlines()]
    py_lines = [json.loads(x) for x in (tmp_path / "python" / "results.jsonl").read_text().splitlines()]
    keys = ("image_id", "finding", "verified", "report_before", "report_after", "frame")
    assert [[line[k] for k in keys] for line in py_lines] == [[line[k] for k in keys] for line in cli_lines]
    assert len(cli_lines) == 2


def test_search_grid_early_stop_round_trips_and_refuses_bad_rules():
    settings = ExplainSettings(search=SearchGrid(null_settings=("negative-prompt",), early_stop=[1, 3]))
    assert settings.search.early_stop == (1, 3)
    again = ExplainSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings and again.search.maker_kwargs()["early_stop"] == (1, 3)
    for bad in ((0, 3), (1, 6), (1,), (1.5, 3)):
        with pytest.raises(ValueError, match="SearchGrid.early_stop"):
            SearchGrid(early_stop=bad)
