"""The metric-guided search as a maker: plugs into CyclicExplainer, run_explainer and `cyclex explain --search`.

Tiny random SD pipelines (2 DDIM steps, 1-2 NTI inner steps, a 2 x 2 x 2 grid); scorers and cycle checks
whose answers are scripted, so the setting the search must stop at is known in advance.
"""

from __future__ import annotations

import json

import pytest
import torch
from cycle_fakes import KeywordLabeler, brightness_generator, query
from PIL import Image
from typer.testing import CliRunner

from cyclex.counterfactuals.inversion_cache import InversionCache
from cyclex.counterfactuals.nti import NullTextInversionMaker
from cyclex.counterfactuals.search_maker import SearchingMaker, generator_cycle_check, removed_finding
from cyclex.cycle import CyclicExplainer
from cyclex.cycle import run_folder as rf
from cyclex.explain.scores import CounterfactualScore

STEPS = 2
NULL = (1, 1e-5)  # one inner NTI iteration: cheap, still the NTI code path
GRID = {"null_settings": (NULL,), "strengths": (1.0, 0.8), "guidances": (9, 7)}


class ScriptedScorer:
    """Call k (one per guidance batch) returns the scores of `script[k]` (default all 3)."""

    def __init__(self, script=()):
        self.script = [list(s) for s in script]
        self.calls = 0

    def score(self, factual, counterfactual, finding):
        scores = self.script[self.calls] if self.calls < len(self.script) else [3] * counterfactual.shape[0]
        self.calls += 1
        assert len(scores) == counterfactual.shape[0] and factual.shape == counterfactual.shape
        return [CounterfactualScore(score=s, passed={}, failed=[] if s == 5 else ["cpg"], values={"cpg": 0.1 * s})
                for s in scores]


class ScriptedCycle:
    def __init__(self, answers):
        self.answers = list(answers)
        self.seen = []

    def __call__(self, images, findings):
        self.seen.append(list(findings))
        return [self.answers.pop(0) for _ in findings]


def tiny_makers(cache=None):
    from cyclex.demo.tiny_sd import TinySDConfig, tiny_sd_pipeline

    cache = cache if cache is not None else InversionCache()
    return {c: NullTextInversionMaker(tiny_sd_pipeline(TinySDConfig(seed=i)), STEPS, checkpoint=c, cache=cache,
                                      inversion_guidance=7.0)
            for i, c in enumerate(("best_l1", "best_l2"))}


@pytest.fixture(scope="module")
def makers():
    torch.manual_seed(0)
    return tiny_makers()


def test_removed_finding_parses_prompts():
    assert removed_finding("The lung with abnormalities Cardiomegaly, Edema",
                           "The lung with abnormalities Edema") == "Cardiomegaly"
    with pytest.raises(ValueError, match="exactly one finding"):
        removed_finding("The lung with abnormalities Cardiomegaly, Edema", "The lung with no abnormalities")


def test_search_maker_in_the_engine_stops_at_the_first_accepted_setting(makers):
    # order: best_l2 before best_l1, strength 1.0 before 0.8, guidance 7 (paper share) before 9
    scorer = ScriptedScorer([[3, 3], [5, 4], [4, 5]])  # (l2, 1.0): none; (l2, .8): omega 7; (l1, 1.0): omega 9
    cycle = ScriptedCycle([False, True])  # the first CF_Score-5 candidate fails the cycle, the second holds
    maker = SearchingMaker(makers, scorer, cycle_check=cycle, checkpoints=("best_l1", "best_l2"), **GRID)
    calls_before = {c: m.ld.unet_calls for c, m in makers.items()}
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), maker, frame_threshold=95)
    image = query(heart=0.9)  # Cardiomegaly only
    results = explainer.explain(image[None])
    assert [r.finding for r in results] == ["Cardiomegaly"]
    details = results[0].maker_details
    assert details["accepted"] is True and details["score"] == 5
    assert details["setting"] == {"null_setting": list(NULL), "checkpoint": "best_l1", "strength": 1.0, "guidance": 9.0}
    assert details["n_attempts"] == 6 and scorer.calls == 3 and cycle.seen == [["Cardiomegaly"], ["Cardiomegaly"]]
    assert details["variant"] == "nti+search" and details["search"]["checkpoints"] == ["best_l2", "best_l1"]
    # reported UNet calls are what the two checkpoints' UNets actually ran; best_l1 inverted once for both strengths
    spent = {c: m.ld.unet_calls - calls_before[c] for c, m in makers.items()}
    assert details["unet_calls"] == spent["best_l2"] + spent["best_l1"] and spent["best_l1"] > 0
    # the returned counterfactual is exactly that setting's edit (DDIM is deterministic)
    ref_maker = makers["best_l1"].with_null_setting(NULL)
    source, target = results[0].source_prompt, results[0].target_prompt
    expected = ref_maker.edit(ref_maker.invert(image[None], [source]), [target], guidances=[9.0], strength=1.0,
                              output_size=(32, 32))[0, 0, 0].clamp(0, 1).numpy()
    assert abs(results[0].counterfactual - expected).max() < 1e-5
    assert len(maker.results) == 1 and maker.results[0].accepted


def test_search_maker_reports_the_best_when_nothing_is_accepted(makers):
    scorer = ScriptedScorer([[3, 3], [3, 4], [3, 3], [3, 3]])  # never 5: the cycle check is never asked
    cycle = ScriptedCycle([])
    maker = SearchingMaker(makers, scorer, cycle_check=cycle, checkpoints=("best_l2", "best_l1"), **GRID)
    out = maker.make(query(heart=0.9)[None], ["The lung with abnormalities Cardiomegaly"],
                     ["The lung with no abnormalities"])
    detail = out.details[0]
    assert detail["accepted"] is False and detail["n_attempts"] == 8 and cycle.seen == []
    assert detail["score"] == 4 and detail["setting"]["checkpoint"] == "best_l2" and detail["setting"]["strength"] == 0.8
    assert detail["setting"]["guidance"] == 9.0 and out.images.shape == (1, 1, 32, 32)


def test_search_maker_without_a_cycle_check_says_how_to_get_one(makers):
    maker = SearchingMaker(makers, ScriptedScorer([[5, 5]]), **GRID)
    with pytest.raises(RuntimeError, match="bind_cycle"):
        maker.make(query()[None], ["The lung with abnormalities Cardiomegaly"], ["The lung with no abnormalities"])


def test_run_explainer_writes_attempt_log_and_ablation_and_resumes(makers, tmp_path):
    # every candidate scores 5; the engine's own generator decides the cycle (bind_cycle)
    scorer = ScriptedScorer([[5, 5]] * 100)
    maker = SearchingMaker(makers, scorer, checkpoints=("best_l2",), **GRID)
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), maker, frame_threshold=95)
    records = [{"id": "a", "image": query(heart=0.9, effusion=0.9)[0].numpy()},
               {"id": "b", "image": query(heart=0.9)[0].numpy()}]
    out = tmp_path / "run"
    summary = rf.run_explainer(explainer, records, out, batch_size=1, progress=False)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    log = [json.loads(x) for x in (out / "search_attempts.jsonl").read_text().splitlines()]
    assert len(lines) == summary["n"] == len(log) == 3
    for line in lines:  # the engine's verification agrees with the search's (same generator, labeler)
        assert line["verified"] == line["maker_details"]["accepted"]
        assert line["settings"]["search"]["strengths"] == [1.0, 0.8]
    for x in log:  # stops after the first strength's guidance batch when that one is accepted
        assert x["n_attempts"] == (2 if x["accepted"] and x["setting"]["strength"] == 1.0 else 4)
    assert sorted(x["finding"] for x in log) == ["Cardiomegaly", "Cardiomegaly", "Pleural Effusion"]
    ablation = json.loads((out / "search_ablation.json").read_text())
    assert ablation["n_findings"] == 3 and ablation["n_accepted"] == sum(x["accepted"] for x in log)
    assert sum(cell["attempts"] for cell in ablation["by_strength_guidance"].values()) == sum(
        x["n_attempts"] for x in log)
    assert ablation["grid"]["guidances"] == [7.0, 9.0]
    # a resumed run does not search finished items again nor duplicate log lines
    again = SearchingMaker(makers, scorer, checkpoints=("best_l2",), **GRID)
    rf.run_explainer(CyclicExplainer(brightness_generator(), KeywordLabeler(), again, frame_threshold=95),
                     records, out, batch_size=1, progress=False)
    assert again.results == [] and len((out / "search_attempts.jsonl").read_text().splitlines()) == 3


def test_generator_cycle_check_uses_uncertainty_setting():
    image = torch.stack([query(heart=0.9), query(heart=0.4), query(heart=0.1)])  # present, possible, absent
    strict = generator_cycle_check(brightness_generator(), KeywordLabeler(), uncertain_as_present=True)
    lenient = generator_cycle_check(brightness_generator(), KeywordLabeler(), uncertain_as_present=False)
    assert strict(image, ["Cardiomegaly"] * 3) == [False, False, True]
    assert lenient(image, ["Cardiomegaly"] * 3) == [False, True, True]


def tiny_tailored(folder, best_l1):
    """A tailored folder (contract C4) of a tiny random SD: two saved checkpoints, best_l2 = the first."""
    from cyclex.demo.tiny_sd import tiny_sd_pipeline

    torch.manual_seed(0)
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(folder)
    for name in ("checkpoint-000001", "checkpoint-000002"):
        pipe.unet.save_pretrained(folder / "checkpoints" / name / "unet")
    (folder / "selection.json").write_text(json.dumps({
        "best_psnr": "checkpoints/checkpoint-000002", "best_l2": "checkpoints/checkpoint-000001",
        "best_l1": f"checkpoints/{best_l1}", "final": "checkpoints/checkpoint-000002", "metrics": {}}))
    (folder / "cyclex_tailored.json").write_text(json.dumps(
        {"vocabulary": [], "prompt_template": "cvlm", "sample_size": 64, "uncertain_as_present": True}))
    return folder


def test_from_pretrained_shares_one_pipeline_when_checkpoints_select_the_same_unet(tmp_path):
    tailored = tiny_tailored(tmp_path / "sd", best_l1="checkpoint-000001")
    explainer = CyclicExplainer.from_pretrained(
        tailored, generator=brightness_generator(), labeler=KeywordLabeler(), variant="nti", search=True,
        scorer=ScriptedScorer(), search_kwargs={"guidances": (9, 8)}, num_inference_steps=STEPS)
    makers = explainer.maker.makers
    assert makers["best_l2"].ld.pipe is makers["best_l1"].ld.pipe
    assert makers["best_l2"].checkpoint == makers["best_l1"].checkpoint  # one inversion cache key for both
    assert makers["best_l2"].cache is makers["best_l1"].cache and makers["best_l2"].inversion_guidance == 8.0
    with pytest.raises(ValueError, match="search=True"):
        CyclicExplainer.from_pretrained(tailored, generator=brightness_generator(), scorer=ScriptedScorer())


def test_from_pretrained_search_needs_a_scorer(tmp_path):
    """The engine never picks a scorer itself: the caller (CLI, demo, user) hands one in."""
    tailored = tiny_tailored(tmp_path / "sd", best_l1="checkpoint-000002")
    with pytest.raises(ValueError, match=r"scorer=.*cyclex\.specs\.scorers\.search_scorer_from_specs"):
        CyclicExplainer.from_pretrained(tailored, generator=brightness_generator(), variant="nti", search=True)


def _search_cli_args(tmp_path, thresholds):
    """`cyclex explain --variant nti --search` on two tiny phantoms, scored with `thresholds` (CFThresholds)."""
    from cyclex.demo.phantom_classifier import (
        PhantomClassifier,
        PhantomClassifierConfig,
        PhantomClassifierNet,
    )
    from cyclex.explain.cf_threshold_calibration import save_cf_thresholds

    torch.manual_seed(0)
    images = tmp_path / "in"
    images.mkdir()
    for image_id, heart in (("a", 0.9), ("b", 0.1)):
        Image.fromarray((query(heart=heart)[0].numpy() * 255).astype("uint8")).save(images / f"{image_id}.png")
    tailored = tiny_tailored(tmp_path / "sd", best_l1="checkpoint-000002")
    config = PhantomClassifierConfig(channels=(8, 16))
    PhantomClassifier(PhantomClassifierNet(config), config).save_pretrained(tmp_path / "clf")
    thresholds_file = save_cf_thresholds(tmp_path / "t.json", thresholds, {"procedure": "test"})
    return ["explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
            "--images", str(images), "--out", str(tmp_path / "run"), "--steps", str(STEPS),
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--variant", "nti", "--search",
            "--classifier", f"phantom:{tmp_path / 'clf'}", "--encoder", "classifier", "--lpips", "stand-in",
            "--thresholds", str(thresholds_file),
            "--search-strengths", "1.0", "--search-guidances", "7,9", "--null-settings", "underfit",
            "--required-score", "5", "--search-guidance-batch", "1"]


def test_cli_explain_variant_nti_search(tmp_path):
    from cyclex.cli import app
    from cyclex.explain.scores import CFThresholds

    # thresholds every counterfactual passes: the cycle alone decides acceptance
    args = _search_cli_args(tmp_path, CFThresholds(lpips=1e9, clip=-2, l2=1e9, cpg=-1e9, fet=-1e9))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["image_id"] for x in lines] == ["a"] and lines[0]["finding"] == "Cardiomegaly"
    details = lines[0]["maker_details"]
    assert details["variant"] == "nti+search" and details["search"]["checkpoints"] == ["best_l2", "best_l1"]
    assert details["search"]["guidance_batch_size"] == 1  # --search-guidance-batch reached the search
    assert lines[0]["verified"] == details["accepted"] and details["thresholds"]["lpips"] == 1e9
    log = [json.loads(x) for x in (out / "search_attempts.jsonl").read_text().splitlines()]
    accepted_first = details["accepted"] and details["setting"]["checkpoint"] == "best_l2"
    assert len(log) == 1 and log[0]["n_attempts"] == (2 if accepted_first else 4)
    assert json.loads((out / "search_ablation.json").read_text())["n_findings"] == 1
    # the search is a setting of the run: resuming without it is refused
    refused = CliRunner().invoke(app, [a for a in args if a != "--search"])
    assert refused.exit_code == 1 and "different settings" in refused.output


def test_cli_search_early_stop_gives_up_after_the_first_attempts(tmp_path):
    from cyclex.cli import app
    from cyclex.explain.scores import CFThresholds

    # thresholds no counterfactual passes: every attempt scores below 5, so the rule 1:5 gives up at once
    args = _search_cli_args(tmp_path, CFThresholds(lpips=-1.0, clip=2.0, l2=-1.0, cpg=1e9, fet=1e9))
    result = CliRunner().invoke(app, [*args, "--search-early-stop", "1:5"])
    assert result.exit_code == 0, result.output
    line = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert line["maker_details"]["search"]["early_stop"] == [1, 5] and not line["maker_details"]["accepted"]
    (log,) = [json.loads(x) for x in (tmp_path / "run" / "search_attempts.jsonl").read_text().splitlines()]
    assert log["n_attempts"] == 1 and log["gave_up"] is True  # 4 attempts without the rule
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--search-early-stop", "0:3"])
    assert bad.exit_code == 1 and "--search-early-stop" in bad.output and "AFTER:BELOW" in bad.output


def test_demo_thresholds_are_calibrated_once_and_read_back(tmp_path, monkeypatch):
    from cyclex.demo import cf_thresholds
    from cyclex.demo.phantom_classifier import (
        PhantomClassifier,
        PhantomClassifierConfig,
        PhantomClassifierNet,
    )

    torch.manual_seed(0)
    config = PhantomClassifierConfig(channels=(8, 16))
    classifier = PhantomClassifier(PhantomClassifierNet(config), config)
    path = tmp_path / "cf_thresholds.json"
    monkeypatch.setattr(cf_thresholds.calibration_values, "__defaults__", (6, cf_thresholds.CALIBRATION_SEED, None))
    monkeypatch.setattr(cf_thresholds, "demo_autoencoder", lambda: None)  # no base SD in this test
    scorer = cf_thresholds.demo_scorer(classifier, thresholds_path=path)
    stored = json.loads(path.read_text())
    assert stored["provenance"]["n_pairs"] == 6 and stored["thresholds"]["lpips"] == scorer.thresholds.lpips
    assert stored["provenance"]["version"] == cf_thresholds.CALIBRATION_VERSION
    assert scorer.thresholds.cpg >= 0.1  # an edit must move the classifier (never below Table 2)
    # read back, not recalibrated: a changed file is what the next scorer uses
    stored["thresholds"]["fet"] = 123.0
    path.write_text(json.dumps(stored))
    assert cf_thresholds.demo_scorer(classifier, thresholds_path=path).thresholds.fet == 123.0
    # a file of an older calibration version is recalibrated
    stored["provenance"]["version"] = 1
    path.write_text(json.dumps(stored))
    assert cf_thresholds.demo_scorer(classifier, thresholds_path=path).thresholds.fet != 123.0
    assert json.loads(path.read_text())["provenance"]["version"] == cf_thresholds.CALIBRATION_VERSION


def test_calibration_passes_counterfactuals_through_the_autoencoder():
    """Version 2: each true counterfactual goes through the autoencoder before it is scored."""
    from cyclex.demo import cf_thresholds

    class RecordingScorer:
        def __init__(self):
            self.counterfactuals = []

        def raw_values(self, factual, counterfactual, finding):
            self.counterfactuals.append(counterfactual.clone())
            l2 = ((factual - counterfactual) ** 2).mean().sqrt()
            return {k: l2.view(1) for k in ("lpips", "clip_cosine", "l2", "cpg", "fet")}

    def halve(images):
        return images * 0.5

    plain, through = RecordingScorer(), RecordingScorer()
    values_plain, seeds_plain = cf_thresholds.calibration_values(plain, n_pairs=3)
    values_through, seeds_through = cf_thresholds.calibration_values(through, n_pairs=3, autoencoder=halve)
    assert seeds_plain == seeds_through and len(seeds_plain) == 3
    for a, b in zip(plain.counterfactuals, through.counterfactuals, strict=True):
        torch.testing.assert_close(b, a * 0.5)
    assert values_through["l2"] != values_plain["l2"]


def test_merge_ranks_folds_each_ranks_attempts_into_the_run_file(makers, tmp_path):
    from cyclex.counterfactuals.search_maker import rank_attempts_path

    maker = SearchingMaker(makers, ScriptedScorer([[3, 3]] * 8), cycle_check=ScriptedCycle([]),
                           checkpoints=("best_l2",), **GRID)
    (tmp_path / "search_attempts.jsonl").write_text(json.dumps({"request": "earlier", "attempts": []}) + "\n")
    maker.start_run(tmp_path, rank=1)  # rank 1 logs into its own file
    maker.make(query(heart=0.9)[None], ["The lung with abnormalities Cardiomegaly"], ["The lung with no abnormalities"])
    rank_file = rank_attempts_path(tmp_path, 1)
    (logged,) = [json.loads(x) for x in rank_file.read_text().splitlines()]
    rank_attempts_path(tmp_path, 0).write_text(json.dumps({"request": "rank0", "attempts": []}) + "\n")
    maker.merge_ranks(tmp_path)
    merged = [json.loads(x)["request"] for x in (tmp_path / "search_attempts.jsonl").read_text().splitlines()]
    assert merged == ["earlier", "rank0", logged["request"]]
    assert not list((tmp_path / "shards").iterdir())
    assert maker.ablation()["n_findings"] == 3  # the ablation covers every rank's searches
    rank_file.write_text("not json\n")
    with pytest.raises(ValueError, match="search_attempts.rank-1.jsonl:1"):
        maker.merge_ranks(tmp_path)
