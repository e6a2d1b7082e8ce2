"""difference_reference="reconstruction": maps and frames against the maker's own redraw of the query."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cycle_fakes import SIZE, KeywordLabeler, PaintingMaker, brightness_generator, query, write_tiny_tailored
from PIL import Image
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.cycle import CyclicExplainer
from cyclex.cycle import run_folder as rf
from cyclex.explain.frames import difference_maps, feature_frame

# what the fake "autoencoder" adds to every image it draws and cannot get rid of (a bright block
# outside every finding's box): 0.45 > 95/255, so it lights up I - CF but cancels in R - CF
TEXTURE_BOX = (0, 6, 12, 20)
TEXTURE = 0.45


def texture() -> torch.Tensor:
    t = torch.zeros(1, 1, SIZE, SIZE)
    y0, y1, x0, x1 = TEXTURE_BOX
    t[..., y0:y1, x0:x1] = TEXTURE
    return t


class TexturedMaker(PaintingMaker):
    """Target == source: the query plus the texture; an edited prompt: PaintingMaker's edit plus the texture.
    Counts `reconstruct` calls and the rows / prompts each call received."""

    name = "textured"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reconstruct_calls: list[tuple[int, list[str]]] = []

    def make(self, images, source_prompts, target_prompts, *, masks=None, seed=0):
        made = super().make(images, source_prompts, target_prompts, masks=masks, seed=seed)
        made.images = made.images + texture()
        return made

    def reconstruct(self, images, source_prompts, *, seed=0):
        self.reconstruct_calls.append((images.shape[0], list(source_prompts)))
        return super().reconstruct(images, source_prompts, seed=seed)


def _explainer(maker=None, reference="reconstruction", **kwargs):
    return CyclicExplainer(brightness_generator(), KeywordLabeler(), maker or TexturedMaker(),
                           frame_threshold=95, difference_reference=reference, **kwargs)


def _queries() -> torch.Tensor:
    # image 0: Cardiomegaly + Pleural Effusion (two findings share one reconstruction); image 1: Cardiomegaly
    return torch.stack([query(heart=0.9, effusion=0.9), query(heart=0.9)])


def _expected_cf(image: torch.Tensor, finding: str) -> np.ndarray:
    cf = image.clone()
    y0, y1, x0, x1 = PaintingMaker.boxes[finding]
    cf[0, y0:y1, x0:x1] = 0.1
    return (cf + texture()[0])[0].numpy()


def test_difference_is_reconstruction_minus_counterfactual():
    images = _queries()
    results = _explainer().explain(images)
    assert [(r.image_index, r.finding) for r in results] == [
        (0, "Cardiomegaly"), (0, "Pleural Effusion"), (1, "Cardiomegaly")]
    for r in results:
        expected_reference = (images[r.image_index] + texture()[0])[0].numpy()
        np.testing.assert_allclose(r.reference, expected_reference, atol=1e-6)
        np.testing.assert_allclose(r.counterfactual, _expected_cf(images[r.image_index], r.finding), atol=1e-6)
        np.testing.assert_array_equal(r.difference, r.reference - r.counterfactual)
        np.testing.assert_array_equal(r.positive, difference_maps(r.reference, r.counterfactual, positive_blur=5)[2])
        # the texture cancels: R - CF is exactly the edit (0.9 -> 0.1 in the finding's box, 0 elsewhere)
        y0, y1, x0, x1 = PaintingMaker.boxes[r.finding]
        edit = np.zeros((SIZE, SIZE), np.float32)
        edit[y0:y1, x0:x1] = 0.8
        np.testing.assert_allclose(r.difference, edit, atol=1e-6)
        # the frame lies in the edited box alone (blurred corners of the small boxes may drop out)
        inside = np.zeros((SIZE, SIZE), bool)
        inside[y0:y1, x0:x1] = True
        assert r.frame.mask.any() and not (r.frame.mask & ~inside).any()
        if r.finding == "Cardiomegaly":
            assert r.frame.mask.sum() == (y1 - y0) * (x1 - x0)
        np.testing.assert_array_equal(r.frame.mask, feature_frame(r.reference, r.counterfactual, threshold=95).mask)
        assert r.to_record()["difference_reference"] == "reconstruction"
        assert r.verified


def test_reconstruct_is_called_once_per_image():
    maker = TexturedMaker()
    explainer = _explainer(maker)
    results = explainer.explain(_queries())
    assert len(results) == 3
    assert len(maker.reconstruct_calls) == 1  # one batched call for the whole plan
    rows, prompts = maker.reconstruct_calls[0]
    assert rows == 2  # image 0's two findings share its reconstruction
    assert prompts == [results[0].source_prompt, results[2].source_prompt]
    assert results[0].reference is results[1].reference
    assert "reconstructions" in results[0].maker_details["seconds_per_item"]
    assert explainer.settings()["difference_reference"] == "reconstruction"
    # restricting the findings: only images with something to remove are reconstructed
    maker.reconstruct_calls.clear()
    explainer.explain(_queries(), findings=["Pleural Effusion"])
    assert [rows for rows, _ in maker.reconstruct_calls] == [1]


def test_default_differences_against_the_query():
    maker = TexturedMaker()
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), maker, frame_threshold=95)
    assert explainer.difference_reference == "query" and explainer.settings()["difference_reference"] == "query"
    images = _queries()
    results = explainer.explain(images)
    assert maker.reconstruct_calls == []
    for r in results:
        np.testing.assert_array_equal(r.difference, r.query - r.counterfactual)
        np.testing.assert_array_equal(r.positive, difference_maps(r.query, r.counterfactual, positive_blur=5)[2])
        assert r.reference is None and r.to_record()["difference_reference"] == "query"
        # the texture the maker cannot reproduce lights up I - CF (what the option is for)
        y0, y1, x0, x1 = TEXTURE_BOX
        assert r.frame.mask[y0:y1, x0:x1].any()
        np.testing.assert_allclose(r.difference[y0:y1, x0:x1], -TEXTURE, atol=1e-6)


def test_invalid_reference_and_searching_makers_are_refused():
    with pytest.raises(ValueError, match="difference_reference.*'query'.*'reconstruction'"):
        _explainer(reference="recon")

    class PerFindingMaker(TexturedMaker):
        reconstructs_with_fixed_settings = False

    with pytest.raises(ValueError, match="difference_reference='reconstruction'.*PerFindingMaker"):
        _explainer(PerFindingMaker())
    assert _explainer(PerFindingMaker(), reference="query").difference_reference == "query"

    from cyclex.counterfactuals.base import CounterfactualMaker
    from cyclex.counterfactuals.search_maker import SearchingMaker

    assert CounterfactualMaker.reconstructs_with_fixed_settings is True
    assert SearchingMaker.reconstructs_with_fixed_settings is False


def _records(folder):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, (heart, effusion) in {"a": (0.9, 0.9), "b": (0.9, 0.1), "n": (0.1, 0.1)}.items():
        path = folder / f"{image_id}.png"
        Image.fromarray(np.uint8(query(heart, effusion)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": image_id, "image": str(path)})
    return records


def test_run_folder_writes_the_reconstruction(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    rf.run_explainer(_explainer(), records, out, batch_size=2, progress=False)
    config = json.loads((out / "run_config.json").read_text())
    assert config["difference_reference"] == "reconstruction"
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["image_id"], x["finding"]) for x in lines] == [
        ("a", "Cardiomegaly"), ("a", "Pleural Effusion"), ("b", "Cardiomegaly")]
    for line in lines:
        assert line["difference_reference"] == "reconstruction"
        assert line["settings"]["difference_reference"] == "reconstruction"
        path = out / line["files"]["reconstruction"]
        assert path.name == "reconstruction.png" and path.is_file()
        with Image.open(path) as png:
            redrawn = np.asarray(png, np.float32) / 255
        with Image.open(out / line["query_png"]) as png:
            drawn_query = np.asarray(png, np.float32) / 255
        expected = np.clip(drawn_query + texture()[0, 0].numpy(), 0, 1)
        np.testing.assert_allclose(redrawn, expected, atol=1.5 / 255)
        signed = np.load(out / line["signed_npy"])
        y0, y1, x0, x1 = TEXTURE_BOX
        assert np.abs(signed[y0:y1, x0:x1]).max() < 1e-6  # R - CF, not I - CF
    # the HTML report shows the reference beside the query
    from cyclex.cycle.report_html import write_run_report

    page = Path(write_run_report(out)).read_text()
    assert page.count("reconstruction.png") >= len(lines) and "Reconstruction R" in page
    # resuming the folder with the other reference is refused by the settings check
    with pytest.raises(rf.RunFolderError, match="difference_reference"):
        rf.run_explainer(_explainer(reference="query"), records, out, batch_size=2, progress=False)
    # a query run writes no reconstruction
    plain = tmp_path / "plain"
    rf.run_explainer(_explainer(reference="query"), records, plain, progress=False)
    assert not list(plain.rglob("reconstruction.png"))
    first = json.loads((plain / "results.jsonl").read_text().splitlines()[0])
    assert "reconstruction" not in first["files"] and first["difference_reference"] == "query"
    assert "Reconstruction R" not in Path(write_run_report(plain)).read_text()


def test_run_explain_passes_the_reference_through(tmp_path, monkeypatch):
    seen = {}

    def fake_from_pretrained(tailored_dir, *, generator, labeler=None, explainer_kwargs=None, **kwargs):
        seen.update(explainer_kwargs)
        return CyclicExplainer(generator, KeywordLabeler(), TexturedMaker(), **explainer_kwargs)

    monkeypatch.setattr(rf.CyclicExplainer, "from_pretrained", staticmethod(fake_from_pretrained))
    records = _records(tmp_path / "in")
    rf.run_explain(brightness_generator(), tmp_path, records, tmp_path / "run", frame_threshold=95,
                   difference_reference="reconstruction", progress=False)
    assert seen["difference_reference"] == "reconstruction"
    assert len(list((tmp_path / "run").rglob("reconstruction.png"))) == 3


def test_cli_lists_and_passes_the_option(tmp_path, monkeypatch):
    runner = CliRunner()
    help_text = runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "250"})
    assert help_text.exit_code == 0 and "--difference-reference" in help_text.output
    assert "query|reconstruction" in help_text.output

    import cyclex.cycle.report_html
    import cyclex.specs.generators

    captured = {}

    def fake_run_explain(generator, tailored, images, out, **kwargs):
        captured.update(kwargs)
        return {"cyclic_rate": None, "n_verified": 0, "n": 0, "n_images": 0, "per_finding": {}}

    monkeypatch.setattr(rf, "run_explain", fake_run_explain)
    monkeypatch.setattr(cyclex.specs.generators, "load_generator", lambda spec: brightness_generator())
    monkeypatch.setattr(cyclex.cycle.report_html, "write_run_report", lambda out: f"{out}/index.html")
    base = ["explain", "--generator", "fake", "--tailored", str(tmp_path), "--images", str(tmp_path),
            "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*base, "--difference-reference", "reconstruction"])
    assert result.exit_code == 0, result.output
    assert captured["settings"].difference_reference == "reconstruction"  # typed ExplainSettings (issue 15)
    result = runner.invoke(app, base)
    assert result.exit_code == 0 and captured["settings"].difference_reference == "query"
    bad = runner.invoke(app, [*base, "--difference-reference", "cf"])
    assert bad.exit_code != 0


def _fake_demo_models(monkeypatch, tmp_path, run_explain):
    """run_demo without models: fake assets, generator and reports; `run_explain` stands in for the run."""
    import cyclex.cycle.report_html
    import cyclex.specs.generators
    from cyclex.demo import run_demo as demo

    monkeypatch.setattr(demo, "demo_assets", lambda names: {n: {"tailored": tmp_path, "generator": tmp_path}
                                                            for n in names})
    monkeypatch.setattr(demo, "shortcut_marker_overlap", lambda run: {})
    monkeypatch.setattr(rf, "run_explain", run_explain)
    monkeypatch.setattr(cyclex.specs.generators, "load_generator", lambda spec: brightness_generator())
    monkeypatch.setattr(cyclex.cycle.report_html, "write_run_report", lambda out: None)
    monkeypatch.setattr(cyclex.cycle.report_html, "write_comparison_report", lambda runs, out: out)


def test_demo_passes_the_reference_through(tmp_path, monkeypatch):
    from cyclex.demo import run_demo as demo

    assert demo.DEMO_DIFFERENCE_REFERENCE in ("query", "reconstruction")
    calls = []

    def fake_run_explain(generator, tailored, records, out, **kwargs):
        calls.append(kwargs["difference_reference"])
        return {"cyclic_rate": None, "n": 0, "per_finding": {}}

    _fake_demo_models(monkeypatch, tmp_path, fake_run_explain)
    demo.run_demo(tmp_path / "demo", n_images=1, names=("clean",), progress=False)
    demo.run_demo(tmp_path / "demo", n_images=1, names=("clean",), progress=False,
                  difference_reference="reconstruction")
    assert calls == [demo.DEMO_DIFFERENCE_REFERENCE, "reconstruction"]

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kwargs: seen.update(kwargs) or {
        "n_images": 0, "generators": {}, "seconds": 0.0})
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--difference-reference", "reconstruction"])
    assert result.exit_code == 0, result.output
    assert seen["difference_reference"] == "reconstruction"
    seen.clear()
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0 and "difference_reference" not in seen  # run_demo's constant applies


def test_cli_explain_with_reconstruction_on_a_tiny_tailored_sd(tmp_path):
    records = _records(tmp_path / "in")
    tailored = write_tiny_tailored(tmp_path / "sd")
    out = tmp_path / "run"
    args = ["explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
            "--images", str(tmp_path / "in"), "--out", str(out), "--steps", "2", "--guidance", "5",
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly",
            "--difference-reference", "reconstruction"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["image_id"] for x in lines] == [r["id"] for r in records if r["id"] != "n"]
    for line in lines:
        with Image.open(out / line["files"]["reconstruction"]) as png:
            redrawn = np.asarray(png, np.float32) / 255
        with Image.open(out / line["counterfactual_png"]) as png:
            cf = np.asarray(png, np.float32) / 255
        signed = np.load(out / line["signed_npy"])
        np.testing.assert_allclose(signed, redrawn - cf, atol=1.5 / 255)  # R - CF (PNGs are 8 bit)
        assert line["settings"]["difference_reference"] == "reconstruction"


def test_runs_written_before_the_option_resume_as_query(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    rf.run_explainer(_explainer(reference="query"), records, out, progress=False)
    config_path = out / "run_config.json"
    old = json.loads(config_path.read_text())
    del old["difference_reference"]  # as written before the option existed
    config_path.write_text(json.dumps(old))
    rf.run_explainer(_explainer(reference="query"), records, out, progress=False)  # resumes
    with pytest.raises(rf.RunFolderError, match="difference_reference"):
        rf.run_explainer(_explainer(), records, out, progress=False)


def test_runs_written_before_map_blur_resume_only_with_the_raw_map(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    raw = CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker(), frame_threshold=95, map_blur=1)
    rf.run_explainer(raw, records, out, progress=False)
    config_path = out / "run_config.json"
    old = json.loads(config_path.read_text())
    del old["map_blur"]  # as written before the option existed: those runs saved max(I - CF, 0) unsmoothed
    config_path.write_text(json.dumps(old))
    rf.run_explainer(raw, records, out, progress=False)  # resumes
    smoothed = CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker(), frame_threshold=95)
    with pytest.raises(rf.RunFolderError, match="map_blur"):
        rf.run_explainer(smoothed, records, out, progress=False)


def test_demo_starts_its_own_run_over_when_the_settings_changed_but_not_other_errors(tmp_path, monkeypatch):
    from cyclex.demo import run_demo as demo

    calls = []

    def fake_run_explain(generator, tailored, records, out, **kwargs):
        calls.append(kwargs["overwrite"])
        if not kwargs["overwrite"]:
            raise rf.RunSettingsChanged(f"{out} differs in map_blur", ["map_blur"])
        return {"cyclic_rate": None, "n": 0, "per_finding": {}}

    _fake_demo_models(monkeypatch, tmp_path, fake_run_explain)
    demo.run_demo(tmp_path / "demo", n_images=1, names=("clean",), progress=False)
    assert calls == [False, True]  # refused with the old settings, then started over

    def not_a_run_folder(generator, tailored, records, out, **kwargs):
        raise rf.RunFolderError(f"{out} exists, is not empty and has no run_config.json")

    monkeypatch.setattr(rf, "run_explain", not_a_run_folder)
    with pytest.raises(rf.RunFolderError, match="not empty"):  # someone else's folder is never overwritten
        demo.run_demo(tmp_path / "demo", n_images=1, names=("clean",), progress=False)
