"""The run folder: files, results.jsonl, summary, resume after an interruption, settings check, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cycle_fakes import HEART, KeywordLabeler, PaintingMaker, brightness_generator, query, write_tiny_tailored
from PIL import Image
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.cycle import CyclicExplainer
from cyclex.cycle import run_folder as rf

# image id -> (heart, effusion, edema); "n" has no finding, "e" an ineffective removal
QUERIES = {"a": (0.9, 0.9, 0.1), "b": (0.9, 0.1, 0.1), "n": (0.1, 0.1, 0.1), "c": (0.9, 0.9, 0.9),
           "e": (0.1, 0.9, 0.1)}


def _write_inputs(folder):
    """Image PNGs, a heart mask for 'a', and records like read_phantom_folder returns."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, (heart, effusion, edema) in QUERIES.items():
        path = folder / f"{image_id}.png"
        Image.fromarray(np.uint8(query(heart, effusion, edema)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": image_id, "image": str(path), "chest_box": [0, 0, 32, 32], "masks": {}})
    mask = np.zeros((32, 32), np.uint8)
    y0, y1, x0, x1 = HEART
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(folder / "a__cardiomegaly.png")
    records[0]["masks"] = {"Cardiomegaly": str(folder / "a__cardiomegaly.png")}
    records[0]["shortcut"] = False
    return records


def _explainer(maker=None):
    return CyclicExplainer(brightness_generator(), KeywordLabeler(), maker or PaintingMaker(ineffective={"Edema"}),
                           frame_threshold=95)


def _lines(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _without_timings(lines):
    return [{k: v for k, v in line.items() if k != "timings"} for line in lines]


def test_run_folder_contents(tmp_path):
    records = _write_inputs(tmp_path / "in")
    out = tmp_path / "run"
    summary = rf.run_explainer(_explainer(), records, out, batch_size=2, progress=False)
    lines = _lines(out)
    # a: Cardiomegaly, Pleural Effusion; b: Cardiomegaly; n: none; c: 3 findings; e: Pleural Effusion
    assert [(x["image_id"], x["finding"]) for x in lines] == [
        ("a", "Cardiomegaly"), ("a", "Pleural Effusion"), ("b", "Cardiomegaly"),
        ("c", "Cardiomegaly"), ("c", "Edema"), ("c", "Pleural Effusion"), ("e", "Pleural Effusion")]
    assert [x["verified"] for x in lines] == [True, True, True, True, False, True, True]
    assert summary["cyclic_rate"] == pytest.approx(6 / 7) and summary["n"] == 7
    assert summary["per_finding"]["Edema"] == {"cyclic_rate": 0.0, "n": 1, "n_verified": 0}
    assert json.loads((out / "summary.json").read_text())["cyclic_rate"] == pytest.approx(6 / 7)
    first = lines[0]
    for key in ("query_png", "counterfactual_png", "difference_png", "frame_png", "frame_mask_png", "signed_npy",
                "positive_npy"):
        assert (out / first[key]).is_file(), key
    with Image.open(out / first["frame_mask_png"]) as png:
        frame_mask = np.asarray(png) > 0
    y0, y1, x0, x1 = HEART
    assert frame_mask.sum() == (y1 - y0) * (x1 - x0) and frame_mask[y0:y1, x0:x1].all()
    assert first["mask_png"] == "items/a/cardiomegaly/mask.png" and (out / first["mask_png"]).is_file()
    assert lines[1]["mask_png"] is None and first["shortcut"] is False
    signed = np.load(out / first["signed_npy"])
    y0, y1, x0, x1 = HEART
    assert signed.shape == (32, 32) and signed[y0:y1, x0:x1].mean() == pytest.approx(0.8, abs=0.01)
    with Image.open(out / first["difference_png"]) as png:
        assert png.mode == "RGB" and png.size == (32, 32)
    assert first["settings"]["variant"] == "painting" and first["chest_box"] == [0, 0, 32, 32]
    assert first["labels_before"]["Cardiomegaly"] == "positive" and first["labels_after"]["Cardiomegaly"] == "blank"
    config = json.loads((out / "run_config.json").read_text())
    assert config["frame_threshold"] == 95 and config["batch_size"] == 2
    assert not list(out.rglob("*.tmp"))


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    records = _write_inputs(tmp_path / "in")
    reference = tmp_path / "reference"
    rf.run_explainer(_explainer(), records, reference, batch_size=2, progress=False)

    out = tmp_path / "interrupted"
    real_write = rf._write_item
    written = []

    def crash_after_four(*args, **kwargs):
        if len(written) == 4:  # items a/Cardiomegaly, a/Pleural Effusion, b/Cardiomegaly, c/Cardiomegaly
            raise KeyboardInterrupt("simulated crash")
        written.append(args[2].finding)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(rf, "_write_item", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        rf.run_explainer(_explainer(), records, out, batch_size=2, progress=False)
    monkeypatch.setattr(rf, "_write_item", real_write)
    assert len(list((out / "records").rglob("*.json"))) == 4 + 2  # 4 items + 'a', 'b' complete markers

    maker = PaintingMaker(ineffective={"Edema"})
    rf.run_explainer(_explainer(maker), records, out, batch_size=2, progress=False)
    # only the 3 unfinished items were made again (c's Edema and Pleural Effusion, e's Pleural Effusion)
    assert maker.requests == 3
    assert _without_timings(_lines(out)) == _without_timings(_lines(reference))
    # a finished run re-run does nothing
    again = PaintingMaker()
    rf.run_explainer(_explainer(again), records, out, batch_size=3, progress=False)
    assert again.requests == 0 and _without_timings(_lines(out)) == _without_timings(_lines(reference))


def test_refuses_other_settings_unless_overwrite(tmp_path):
    records = _write_inputs(tmp_path / "in")
    out = tmp_path / "run"
    rf.run_explainer(_explainer(), records, out, batch_size=2, progress=False)
    with pytest.raises(rf.RunFolderError, match="findings"):
        rf.run_explainer(_explainer(), records, out, findings=["Cardiomegaly"], progress=False)
    (out / "index.html").write_text("<html>report of the old run</html>")  # as `cyclex explain` leaves it
    summary = rf.run_explainer(_explainer(), records, out, findings=["cardiomegaly"], overwrite=True, progress=False)
    assert summary["n"] == 3 and {x["finding"] for x in _lines(out)} == {"Cardiomegaly"}
    assert not (out / "index.html").exists()  # the old run's report went with it
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # not a run folder: never written into, not even with overwrite
        with pytest.raises(rf.RunFolderError, match="not empty"):
            rf.run_explainer(_explainer(), records, stranger, overwrite=overwrite, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unique"):
        rf.run_explainer(_explainer(), records + records[:1], tmp_path / "dup", progress=False)


def test_load_image_records_from_folder_and_csv(tmp_path):
    _write_inputs(tmp_path / "in")
    folder_records = rf.load_image_records(tmp_path / "in")
    assert [r["id"] for r in folder_records] == sorted(["a", "a__cardiomegaly", "b", "c", "e", "n"])
    (tmp_path / "list.csv").write_text("id,path,x0,y0,x1,y1\nfirst,in/a.png,0,0,30,31\nsecond,in/b.png,,,,\n")
    csv_records = rf.load_image_records(tmp_path / "list.csv")
    assert csv_records[0] == {"id": "first", "image": str(tmp_path / "in" / "a.png"), "chest_box": [0, 0, 30, 31]}
    assert "chest_box" not in csv_records[1]
    with pytest.raises(FileNotFoundError, match="--images"):
        rf.load_image_records(tmp_path / "missing")
    assert rf.safe_name("a/b c") != rf.safe_name("a_b_c") and rf.safe_name("plain-1") == "plain-1"


def test_cli_explain_on_a_tiny_tailored_sd(tmp_path):
    _write_inputs(tmp_path / "in")
    (tmp_path / "in" / "a__cardiomegaly.png").unlink()
    tailored = write_tiny_tailored(tmp_path / "sd")
    out = tmp_path / "run"
    args = ["explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
            "--images", str(tmp_path / "in"), "--out", str(out), "--steps", "2", "--guidance", "5",
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly", "--batch-size", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Cyclic Rate" in result.output
    lines = _lines(out)
    assert [x["image_id"] for x in lines] == ["a", "b", "c"]
    assert lines[0]["settings"]["steps"] == 2 and lines[0]["settings"]["guidance"] == 5.0
    # different settings into the same folder: refused with a clear message
    refused = CliRunner().invoke(app, [*args[:-4], "--findings", "Edema"])
    assert refused.exit_code == 1 and "different settings" in refused.output


def test_phantom_folder_records_carry_masks_and_chest_boxes(tmp_path):
    from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
    from cyclex.datasets.phantom import PhantomConfig, ShortcutConfig, make_phantoms, write_phantom_folder
    from cyclex.labelers import RuleLabeler

    phantoms = make_phantoms(4, seed=0, config=PhantomConfig(shortcut=ShortcutConfig(rate_without_finding=1.0)))
    write_phantom_folder(phantoms, tmp_path / "phantoms")
    records = rf.load_image_records(tmp_path / "phantoms")
    assert [r["id"] for r in records] == [p.id for p in phantoms]
    reports = {np.uint8(p.image * 255 + 0.5).tobytes(): p.report for p in phantoms}

    def report_of(images):  # the ground-truth report for a known phantom, "normal" for anything else
        keys = [np.uint8(img[0].numpy() * 255 + 0.5).tobytes() for img in images]
        return [reports.get(k, "No acute cardiopulmonary process.") for k in keys]

    class Darken(CounterfactualMaker):
        name = "darken"

        def make(self, images, source_prompts, target_prompts, *, masks=None, seed=0):
            return CounterfactualOutput(images=images * 0.5, details=[{}] * images.shape[0])

    from cyclex.adapters import CallableGenerator

    explainer = CyclicExplainer(CallableGenerator(report_of), RuleLabeler(), Darken(), frame_threshold="stable")
    summary = rf.run_explainer(explainer, records, tmp_path / "run", progress=False)
    lines = _lines(tmp_path / "run")
    expected = [(p.id, f) for p in phantoms for f in p.labels.present()]
    assert [(x["image_id"], x["finding"]) for x in lines] == expected and summary["cyclic_rate"] == 1.0
    by_id = {p.id: p for p in phantoms}
    for line in lines:
        phantom = by_id[line["image_id"]]
        assert line["chest_box"] == list(phantom.chest_box)
        with Image.open(tmp_path / "run" / line["mask_png"]) as png:
            np.testing.assert_array_equal(np.asarray(png) > 0, phantom.masks[line["finding"]])
        assert line["shortcut"] == phantom.shortcut
        if phantom.shortcut:
            with Image.open(tmp_path / "run" / line["shortcut_mask_png"]) as png:
                np.testing.assert_array_equal(np.asarray(png) > 0, phantom.shortcut_mask)
    assert any(line.get("shortcut_mask_png") for line in lines)
