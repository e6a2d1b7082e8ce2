"""`cyclex evaluate`: a hand-made run folder in the engine's layout gains metrics, aggregates, figures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.explain.evaluate_run import EvaluationConfig, RunFormatError, evaluate_run, read_results
from cyclex.explain.figures import plot_cpg_distribution, plot_hit_rate_curves, plot_roc_curves


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.uint8(np.clip(array, 0, 1) * 255 + 0.5)).save(path)


def make_run(tmp_path, with_signed=True):
    """Two items: the counterfactual removes a bright 6x6 blob (the mask), plus a text marker outside
    the chest box that also changes (seed 000's artefact)."""
    run = tmp_path / "run"
    lines = []
    rng = np.random.default_rng(0)
    for i, finding in enumerate(["Cardiomegaly", "Pleural Effusion"]):
        background = 0.2 + 0.1 * rng.random((32, 32))
        mask = np.zeros((32, 32), dtype=bool)
        mask[10 + i:16 + i, 12:18] = True
        query = background + 0.5 * mask
        query[0:4, 0:4] = 0.95  # marker, outside the chest box
        counterfactual = background.copy()
        rel = f"items/img{i}/{finding.lower().replace(' ', '-')}"
        write_png(run / rel / "query.png", query)
        write_png(run / rel / "counterfactual.png", counterfactual)
        write_png(run / rel / "mask.png", mask.astype(float))
        line = {"image_id": f"img{i}", "finding": finding, "verified": i == 0, "chest_box": [4, 4, 30, 30],
                "query_png": f"{rel}/query.png", "counterfactual_png": f"{rel}/counterfactual.png",
                "diff_png": f"{rel}/difference.png", "mask_png": f"{rel}/mask.png"}
        if with_signed:
            np.save(run / rel / "signed.npy", (query - counterfactual).astype(np.float32))
            line["signed_npy"] = f"{rel}/signed.npy"
        lines.append(line)
    (run / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "summary.json").write_text(json.dumps({"cyclic_rate": 0.5}))
    return run


class BlobClassifier:
    """logit = 10 * mean brightness of rows 8..20 (where the blobs are); encode = (mean, 1)."""

    class_names = ("Cardiomegaly", "Pleural Effusion")

    def __call__(self, images):
        value = 10 * images[:, 0, 8:20, 10:20].flatten(1).mean(1)
        return torch.stack([value, value], dim=1)

    def encode(self, images):
        return torch.stack([images.flatten(1).mean(1), torch.ones(len(images))], dim=1)


def test_evaluate_run_writes_metrics_summary_and_figures(tmp_path):
    run = make_run(tmp_path)
    summary = evaluate_run(run, classifier=BlobClassifier())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == ["img0", "img1"]
    first = rows[0]
    # the blob alone carries 0.5 * 36 px out of the 10 x 12 classifier window (8-bit PNG rounding aside)
    assert first["cpg"] == pytest.approx(10 * 0.5 * 36 / 120, abs=0.05)
    assert first["full/auc"] == pytest.approx(1.0)  # the positive map is exactly the blob inside the box
    assert first["full/hit@1"] == 1.0
    # no LPIPS metric given: its criterion is unavailable, never failed, and the item stays counted
    assert first["lpips"] is None and first["cf_unavailable"] == ["lpips"] and "lpips" not in first["cf_failed"]
    assert first["cf_score"] == 5 - len(first["cf_failed"]) - 1
    acceptance = summary["all"]["acceptance"]
    assert acceptance["n"] == 2 and acceptance["accepted"] == 0
    assert acceptance["rejected"] + acceptance["undetermined"] == 2
    assert summary["all"]["criteria"]["lpips"] == {"n": 2, "passed": 0, "failed": 0, "unavailable": 2,
                                                   "not_applicable": 0}
    if acceptance["undetermined"]:
        assert acceptance["rate"] is None and acceptance["bounds"][1] > acceptance["bounds"][0]
    assert summary["all"]["count"] == 2 and summary["verified"]["count"] == 1
    assert summary["all"]["mean"]["cpg"] == pytest.approx(np.mean([r["cpg"] for r in rows]))
    stored = json.loads((run / "summary.json").read_text())
    assert stored["cyclic_rate"] == 0.5 and stored["metrics"]["all"]["count"] == 2  # engine keys kept
    assert stored["metrics"]["curves"]["full"]["roc"]["auc"] == pytest.approx(1.0)
    for name in ("cpg", "hit_rate", "roc", "threshold_iou"):
        path = run / summary["figures"][name]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chest_box_removes_the_marker_artefact(tmp_path):
    run = make_run(tmp_path, with_signed=False)  # difference from the PNGs
    rows_with_box = evaluate_run(run, classifier=None, config=EvaluationConfig(draw_figures=False))
    lines = read_results(run)
    for line in lines:
        line["chest_box"] = None
    (run / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows_without_box = evaluate_run(run, classifier=None, config=EvaluationConfig(draw_figures=False))
    # the marker outside the chest is the map's maximum: without the box the top-1 % misses the blob
    assert rows_with_box["all"]["mean"]["full/hit@1"] == 1.0
    assert rows_without_box["all"]["mean"]["full/hit@1"] == 0.0
    assert rows_with_box["all"]["mean"]["full/ncc"] > rows_without_box["all"]["mean"]["full/ncc"]


def test_run_format_errors(tmp_path):
    with pytest.raises(RunFormatError, match="results.jsonl not found"):
        evaluate_run(tmp_path)
    (tmp_path / "results.jsonl").write_text(json.dumps({"image_id": "a", "finding": "Edema"}) + "\n")
    with pytest.raises(RunFormatError, match="missing keys"):
        evaluate_run(tmp_path)


def test_cli_evaluate(tmp_path):
    run = make_run(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--classifier", "none", "--encoder", "none",
                                      "--lpips", "none"])
    assert result.exit_code == 0, result.output
    assert "full/auc" in result.output
    assert (run / "metrics.jsonl").is_file() and (run / "figures" / "roc.png").is_file()
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope"), "--classifier", "none",
                                       "--encoder", "none", "--lpips", "none"])
    assert missing.exit_code == 1 and "results.jsonl not found" in " ".join(missing.output.split())


def test_figure_writers_check_their_input(tmp_path):
    path = plot_cpg_distribution([0.5, -0.2, float("nan"), 1.0], tmp_path / "cpg.png")
    assert path.is_file()
    assert plot_roc_curves({"a": ([0, 0.5, 1], [0, 0.8, 1], 0.8)}, tmp_path / "roc.png").is_file()
    with pytest.raises(ValueError, match="shapes"):
        plot_hit_rate_curves({"a": ([1, 2], [0.5])}, tmp_path / "bad.png")


def test_cli_specs(tmp_path, monkeypatch):
    from cyclex.specs.scorers import load_classifier_spec, load_encoder_spec, load_lpips_spec

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        load_lpips_spec("auto")  # no AlexNet weights here: an error, never a silent skip
    assert load_lpips_spec("none") is None
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        load_lpips_spec("alex")
    assert load_classifier_spec("none") is None
    with pytest.raises(ValueError, match="classifier spec"):
        load_classifier_spec("resnet")
    with pytest.raises(ValueError, match="needs a classifier with an encode"):
        load_encoder_spec("classifier", None)
    assert load_encoder_spec("classifier", BlobClassifier()) is not None
    with pytest.raises(ValueError, match="encoder spec"):
        load_encoder_spec("siglip:x", None)


def test_evaluate_a_run_folder_written_by_the_engine(tmp_path):
    """The engine's own run folder (its test fakes: a painting maker on 32 px queries) gains metrics."""
    from cycle_fakes import HEART, KeywordLabeler, PaintingMaker, brightness_generator, query

    from cyclex.cycle import CyclicExplainer
    from cyclex.cycle.run_folder import run_explainer

    folder = tmp_path / "in"
    folder.mkdir()
    image_path = folder / "a.png"
    Image.fromarray(np.uint8(query(0.9, 0.9, 0.1)[0].numpy() * 255 + 0.5)).save(image_path)
    mask = np.zeros((32, 32), np.uint8)
    y0, y1, x0, x1 = HEART
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(folder / "a__cardiomegaly.png")
    records = [{"id": "a", "image": str(image_path), "chest_box": [0, 0, 32, 32],
                "masks": {"Cardiomegaly": str(folder / "a__cardiomegaly.png")}}]
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker(), frame_threshold=95)
    run = tmp_path / "run"
    run_explainer(explainer, records, run, progress=False)

    def heart_logit(images):
        return 10 * images[:, 0, y0:y1, x0:x1].flatten(1).mean(1, keepdim=True)

    from cyclex.explain.effectiveness import CallableClassifier

    summary = evaluate_run(run, classifier=CallableClassifier(heart_logit, ["Cardiomegaly"]),
                           config=EvaluationConfig(draw_figures=False))
    rows = {r["finding"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    heart = rows["Cardiomegaly"]
    assert heart["full/auc"] == pytest.approx(1.0)  # the painted heart is exactly the mask
    assert heart["cpg"] > 5  # the heart region darkened by about 0.7 -> logit drop of about 7
    assert "full/auc" not in rows["Pleural Effusion"]  # no mask for it
    assert summary["all"]["count"] == len(rows)


def test_unavailable_and_not_applicable_criteria_are_counted(tmp_path):
    """A finding the classifier has no class for keeps its item in the denominator (CPG and FET
    unavailable); a threshold that belongs to another encoder makes its criteria not applicable."""
    run = make_run(tmp_path)

    class CardiomegalyOnly(BlobClassifier):
        class_names = ("Cardiomegaly",)

        def __call__(self, images):
            return super().__call__(images)[:, :1]

    summary = evaluate_run(run, classifier=CardiomegalyOnly(),
                           config=EvaluationConfig(draw_figures=False, not_applicable=("clip", "fet")))
    rows = {r["finding"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rows["Pleural Effusion"]["cf_unavailable"] == ["lpips", "cpg"]
    assert rows["Pleural Effusion"]["cf_not_applicable"] == ["clip", "fet"]
    assert rows["Cardiomegaly"]["cf_unavailable"] == ["lpips"]
    criteria = summary["all"]["criteria"]
    assert criteria["cpg"]["unavailable"] == 1 and criteria["cpg"]["n"] == 2
    assert criteria["clip"]["not_applicable"] == 2 and criteria["fet"]["not_applicable"] == 2
    assert summary["all"]["acceptance"]["n"] == 2  # nothing dropped
    assert summary["provenance"]["scorers"]["cpg_classifier"]["name"].endswith("CardiomegalyOnly")
    assert summary["provenance"]["git_commit"]


def test_non_demo_runs_never_get_phantom_scorers_by_default(tmp_path, monkeypatch):
    from cyclex.specs import scorers
    from cyclex.specs.scorers import ScorerUnavailableError, resolve_scorer_specs

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(scorers, "_cached_clip", lambda: None)  # whatever this machine's Hugging Face cache holds
    assert resolve_scorer_specs(demo=True) == ("phantom", "classifier", "stand-in")
    with pytest.raises(ScorerUnavailableError) as missing:
        resolve_scorer_specs(demo=False)
    for flag in ("--classifier xrv:WEIGHTS::PATH", "--encoder clip:PATH_OR_ID", "--lpips alex:PATH"):
        assert flag in str(missing.value)
    assert resolve_scorer_specs("none", "none", "none", demo=False) == ("none", "none", "none")
    run = make_run(tmp_path)
    (run / "run_config.json").write_text(json.dumps({"generator": "hf:/models/gen"}))
    refused = CliRunner().invoke(app, ["evaluate", str(run)])
    assert refused.exit_code == 1 and "--classifier" in refused.output
    assert not (run / "metrics.jsonl").exists()  # stopped before scoring anything


def test_table2_thresholds_do_not_apply_to_other_encoders():
    from cyclex.provenance import STAND_IN_LPIPS
    from cyclex.specs.scorers import TABLE2_THRESHOLDS_SOURCE, criteria_not_applicable

    features = BlobClassifier()
    features.provenance = {"name": "xrv", "kind": "xrv", "roles": {"clip_encoder": {"kind": "xrv-features"}}}
    stand_in = type("StandIn", (), {"provenance": {"name": STAND_IN_LPIPS, "kind": "stand-in"}})()
    clip = type("Clip", (), {"provenance": {"name": "CLIP", "kind": "clip"}})()
    assert criteria_not_applicable(features, None, TABLE2_THRESHOLDS_SOURCE) == ("clip", "fet")
    assert criteria_not_applicable(clip, stand_in, TABLE2_THRESHOLDS_SOURCE) == ("lpips",)
    assert criteria_not_applicable(features, stand_in, {"kind": "file"}) == ()  # calibrated for them


def test_alignment_chest_box_restricts_alignment_not_the_whole_image_measures(tmp_path):
    """Maps on the whole image (the demo): alignment inside the true chest box, the marker outside it
    counted as mass outside the box and as evidence on the marker."""
    run = make_run(tmp_path)
    boxed = evaluate_run(run, classifier=None, config=EvaluationConfig(draw_figures=False))
    lines = read_results(run)
    for line in lines:
        line["alignment_chest_box"] = line.pop("chest_box")
        marker = np.zeros((32, 32))
        marker[0:4, 0:4] = 1.0
        write_png(run / line["query_png"].replace("query.png", "marker.png"), marker)
        line["shortcut_mask_png"] = line["query_png"].replace("query.png", "marker.png")
        line["frame"] = {"components": [{"bbox": [0, 0, 4, 4]}]}
    (run / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    whole = evaluate_run(run, classifier=None, config=EvaluationConfig(draw_figures=False))
    assert whole["all"]["mean"]["full/hit@1"] == boxed["all"]["mean"]["full/hit@1"] == 1.0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # marker: 16 px of ~0.75 (0.95 minus a 0.2-0.3 background) against the 36-px blob of 0.5
    assert all(0.2 < r["mass_outside_chest_box"] < 0.6 for r in rows)
    assert all(r["marker/largest_component_overlaps"] for r in rows)
    # the stricter test: the top 5 % (52 px) hold the marker's 16 px (~0.7) and the blob's 36 px (0.5),
    # so under half of that mass is on the marker although the largest component covers it
    assert all(0.3 < r["marker/top5_mass_share"] < 0.45 and not r["marker/top5_mass_on_marker"] for r in rows)
    assert whole["all"]["marker"] == {"n": 2, "largest_component_overlaps": 2, "top5_mass_on_marker": 0}


def test_marker_mass_helpers():
    from cyclex.explain.evaluate_run import mass_outside_box, top_mass_share

    heat = np.zeros((10, 10))
    heat[0, 0], heat[5, 5] = 3.0, 1.0
    region = np.zeros((10, 10), bool)
    region[0, 0] = True
    assert mass_outside_box(heat, (4, 4, 10, 10)) == pytest.approx(0.75)
    assert mass_outside_box(heat, None) is None and mass_outside_box(np.zeros((4, 4)), (0, 0, 2, 2)) is None
    assert top_mass_share(heat, region, top_percent=5) == pytest.approx(0.75)  # top 5 px: 3 + 1 + zeros
    assert top_mass_share(np.zeros((4, 4)), np.zeros((4, 4), bool)) is None
