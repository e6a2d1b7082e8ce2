"""benchmarks/search.py and benchmarks/search_gpu.py: held-out queries, same grid, intervals, fresh runs.

The end-to-end runs use tiny random components (`--tiny`, one DDIM step): they check the logic and
the shape of the results, never a number's size (random weights make meaningless counterfactuals).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import search as bench
from cyclex.datasets.seed_registry import (
    SEARCH_BENCHMARK_QUERIES,
    SEARCH_VALIDATION,
    TRAINING,
    check_held_out,
    ranges_of,
)

TINY_RUN = ["--tiny", "--findings", "2", "--steps", "1", "--strengths", "1.0", "--guidances", "7", "8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny validation fit, then one tiny benchmark run with it: (argv, results file, work folder, results)."""
    folder = tmp_path_factory.mktemp("search_bench")
    fit = folder / "search_validation.json"
    assert bench.main([*TINY_RUN, "--fit-validation", "--out", str(fit), "--work", str(folder / "fit_work")]) == 0
    argv = [*TINY_RUN, "--out", str(folder / "search.json"), "--work", str(folder / "work"),
            "--validation-fit", str(fit), "--arms", *bench.DEFAULT_ARMS, "cyclex_search"]
    assert bench.main(argv) == 0
    return argv, folder / "search.json", folder / "work", json.loads((folder / "search.json").read_text())


def test_validation_fit_uses_validation_seeds_and_names_the_chosen_arm(tiny_run):
    argv, out, _, results = tiny_run
    fit = json.loads((out.parent / "search_validation.json").read_text())
    (block,) = SEARCH_VALIDATION.ranges
    for start, stop in fit["query_seeds"]:
        assert block[0] <= start < stop <= block[1]
    assert fit["chosen_arm"] in bench.CANDIDATE_ARMS and fit["chosen_arm"] == results["chosen_arm"]
    arms = bench.arms_for(bench.Grid(("default",), ("best_l2",), (1.0,), (7.0,)))
    assert set(fit["rules"]) == {name for name in bench.CANDIDATE_ARMS if arms[name].early_stop}
    assert results["validation_fit"]["sha256"] and results["validation_fit"]["rules"] == fit["rules"]
    for name, row in fit["replayed"].items():  # the replay covers Algorithm 1 and every same-grid arm
        assert 0 <= row["acceptance_rate"] <= 1 and row["unet_calls_per_finding"] > 0, name
    # the held-out queries and the validation phantoms never meet
    assert not {tuple(r) for r in fit["query_seeds"]} & {tuple(r) for r in results["query_seeds"]}
    with pytest.raises(SystemExit, match="steps"):  # a fit for other settings is refused
        bench.main([*[a if a != "1" else "2" for a in argv[:6]], *argv[6:]])


def test_goal_lever_effects_and_generator_calls_are_reported(tiny_run):
    _, _, _, results = tiny_run
    goal = results["goal_tenth_of_algorithm1"]
    assert goal["chosen_arm"] == results["chosen_arm"] and goal["target_unet_calls_ratio"] == 0.1
    assert goal["chosen_ratio"] == results["unet_calls_ratio_cyclex_vs_algorithm1"]
    assert goal["met"] == (goal["missed_by_factor"] is None)
    assert set(results["lever_effects"]) == set(bench.LEVERS) - {"measured_order_same_method"}
    for lever in results["lever_effects"].values():
        assert lever["unet_calls_ratio"]["n_findings"] == 2
    for arm in results["arms"].values():
        assert arm["cycle_checks_per_finding"] <= arm["attempts_per_finding"]


def test_results_have_held_out_queries_provenance_and_same_grid(tiny_run):
    _, _, _, results = tiny_run
    assert results["same_grid"] is True and results["n_findings"] == 2
    (block,) = SEARCH_BENCHMARK_QUERIES.ranges
    for start, stop in results["query_seeds"]:
        assert block[0] <= start < stop <= block[1]
    check_held_out(results["query_seeds"])  # raises on any training or validation seed
    assert results["training_seeds"] == ranges_of(TRAINING)
    provenance = results["provenance"]
    assert {"scorers", "weights_fingerprint", "git_commit", "cyclex_version", "versions"} <= set(provenance)
    assert {"torch", "diffusers"} <= set(provenance["versions"])
    assert {"cpg_classifier", "clip_criterion", "lpips"} <= set(provenance["scorers"])
    assert "gpu" not in results  # GPU figures live in gpu.json only
    assert results["grid"]["strengths"] == [1.0] and results["steps"] == 1


def test_every_arm_has_a_rate_with_its_interval_and_costs(tiny_run):
    _, _, _, results = tiny_run
    assert set(results["arms"]) == {*bench.DEFAULT_ARMS, "cyclex_search", bench.DERIVED_ARM}
    for name, arm in results["arms"].items():
        low, high = arm["acceptance_ci95"]
        assert low <= arm["acceptance_rate"] <= high, name
        assert arm["n_findings"] == 2
        for measure in ("unet_calls", "unet_passes", "seconds"):
            assert arm[f"{measure}_per_finding"] > 0, (name, measure)
            assert len(arm[f"{measure}_per_finding_ci95"]) == 2
    assert set(results["paired_vs_algorithm1"]) == set(results["arms"]) - {bench.BASELINE}
    for name, paired in results["paired_vs_algorithm1"].items():
        assert paired["acceptance_difference"]["n_findings"] == 2, name
        assert len(paired["acceptance_difference"]["ci95"]) == 2 and paired["unet_calls_ratio"]["ratio"] > 0


def test_same_grid_search_accepts_exactly_what_algorithm1_accepts_for_less_work(tiny_run):
    """Same candidates (same method, same grid): the paired difference is 0; the saving is sharing only."""
    _, _, work, results = tiny_run
    paired = results["paired_vs_algorithm1"]["cyclex_search"]
    assert paired["acceptance_difference"]["difference"] == 0.0
    assert paired["acceptance_difference"]["ci95"] == [0.0, 0.0]
    assert paired["unet_calls_ratio"]["ratio"] < 1.0
    records = [json.loads(line) for line in (work / "findings.jsonl").read_text().splitlines()]

    def scores(arm):
        return {(r["index"], json.dumps(a["null_setting"]), a["strength"], a["guidance"]): a["values"]
                for r in records if r["arm"] == arm for a in r["attempts"]}

    algorithm1, cyclex = scores("algorithm1"), scores("cyclex_search")
    assert cyclex and all(algorithm1[key] == values for key, values in cyclex.items())


def test_single_pass_is_algorithm1s_first_attempt(tiny_run):
    _, _, work, results = tiny_run
    first = [json.loads(line) for line in (work / "findings.jsonl").read_text().splitlines()
             if json.loads(line)["arm"] == "algorithm1"][0]
    derived = bench.single_pass_record(first)
    assert derived["attempts"] == first["attempts"][:1] and derived["n_attempts"] == 1
    assert derived["unet_calls"] == first["attempts"][0]["unet_calls"] <= first["unet_calls"]
    assert results["arms"]["single_pass"]["n_findings"] == 2


def test_resume_continues_only_the_same_run(tiny_run):
    argv, out, work, _ = tiny_run
    lines = (work / "findings.jsonl").read_text()
    assert bench.main([*argv, "--resume"]) == 0  # everything done: nothing runs again
    assert (work / "findings.jsonl").read_text() == lines
    resumed = json.loads(out.read_text())
    assert resumed["run"]["resumed"] is True and resumed["n_findings"] == 2
    with pytest.raises(SystemExit, match="settings differs"):
        bench.main([*[a if a != "2" else "3" for a in argv], "--resume"])  # --findings 3


def test_resume_is_refused_when_weights_or_version_differ_and_fresh_runs_start_over(tmp_path):
    identity = {"format": bench.FORMAT, "cyclex_version": "0.1.0", "weights_fingerprint": "abc", "settings": {"n": 1}}
    assert bench.start_work(tmp_path, identity, resume=False) == []
    (tmp_path / "findings.jsonl").write_text(json.dumps({"index": 0, "arm": "algorithm1"}) + "\n")
    assert len(bench.start_work(tmp_path, identity, resume=True)) == 1
    for key, other in (("weights_fingerprint", "def"), ("cyclex_version", "0.2.0")):
        with pytest.raises(SystemExit, match=f"{key} differs"):
            bench.start_work(tmp_path, {**identity, key: other}, resume=True)
    assert bench.start_work(tmp_path, identity, resume=False) == []  # fresh: the old log is gone
    assert not (tmp_path / "findings.jsonl").exists()
    with pytest.raises(SystemExit, match="no earlier run"):
        bench.start_work(tmp_path / "never", identity, resume=True)


def test_queries_on_training_seeds_are_refused():
    with pytest.raises(ValueError, match="training or validation"):
        bench.drawn_query_ranges_of_seeds([0, 1, 2])  # the demo generators' and classifier's training images
    first = SEARCH_BENCHMARK_QUERIES.ranges[0][0]
    assert bench.drawn_query_ranges_of_seeds([first + 2, first, first + 1]) == [[first, first + 3]]


def test_arm_summary_and_paired_comparison_count_by_hand():
    def record(index, accepted, calls, null="default"):
        return {"index": index, "accepted": accepted, "score": 5 if accepted else 3, "unet_calls": calls,
                "unet_passes": calls // 2, "seconds": calls / 100, "setting": {"null_setting": null}, "attempts": [],
                "n_attempts": calls // 10, "cycle_checks": int(accepted), "gave_up": not accepted and calls < 100}

    baseline = [record(0, True, 100), record(1, False, 400), record(2, True, 100), record(3, False, 400)]
    arm = [record(0, True, 10), record(1, True, 40, "underfit"), record(2, True, 10), record(3, False, 40)]
    summary = bench.arm_summary(arm)
    assert summary["acceptance_rate"] == 0.75 and summary["n_accepted"] == 3
    assert summary["unet_calls_per_finding"] == 25.0 and summary["unet_calls_per_accepted"] == pytest.approx(100 / 3)
    assert summary["accepted_by_null_setting"] == {"default": 2, "underfit": 1}
    assert summary["attempts_per_finding"] == 2.5 and summary["cycle_checks_per_finding"] == 0.75
    assert summary["n_gave_up"] == 1
    paired = bench.paired_comparison(arm, baseline)
    assert paired["acceptance_difference"]["difference"] == 0.25
    assert paired["acceptance_difference"]["n_a_only"] == 1 and paired["acceptance_difference"]["n_b_only"] == 0
    assert paired["unet_calls_ratio"]["ratio"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same findings"):
        bench.paired_comparison(arm[:3], baseline)


def test_benchmark_cycle_check_and_stand_in_lpips():
    from cyclex.counterfactuals.search_maker import generator_cycle_check
    from cyclex.demo.phantom_classifier import PhantomClassifierConfig, PhantomClassifierNet
    from cyclex.explain.stand_in_lpips import StandInLPIPS
    from cyclex.findings import FindingLabels, LabelState

    torch.manual_seed(0)
    metric = StandInLPIPS(PhantomClassifierNet(PhantomClassifierConfig()))
    a, b = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    assert torch.allclose(metric(a, a), torch.zeros(2), atol=1e-6)
    assert (metric(a, b) > 0).all() and torch.allclose(metric(a, b), metric(b, a), atol=1e-5)

    class Generator:
        def generate(self, images):
            return ["cardiomegaly" if float(img.mean()) > 0.5 else "normal" for img in images]

    class Labeler:
        def label(self, reports):
            return [FindingLabels({"Cardiomegaly": LabelState.POSITIVE} if r == "cardiomegaly" else {}) for r in reports]

    check = generator_cycle_check(Generator(), Labeler())
    images = torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])
    assert check(images, ["Cardiomegaly", "Cardiomegaly"]) == [False, True]


def bench_gpu_results_name() -> str:
    from benchmarks.search_gpu import RESULTS

    return RESULTS.name


def test_gpu_benchmark_writes_its_own_file_with_provenance(tmp_path):
    """benchmarks/search_gpu.py --tiny (CPU logic check): its own file, device / date / commit / versions."""
    from benchmarks.search_gpu import main

    with pytest.raises(SystemExit):  # a tiny run never writes the GPU results file
        main(["--tiny", "--steps", "1", "--device", "cpu"])
    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--steps", "1", "--repeats", "1", "--dtype", "bfloat16", "--device", "cpu",
                 "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "gpu" and "tiny" in figures["model"] and figures["steps"] == 1
    assert bench_gpu_results_name() == "gpu.json"
    assert set(figures["goals"]) == set(figures["targets_seconds"])
    for key, goal in figures["goals"].items():
        assert goal["measured"] == figures[key] and goal["met"] == (figures[key] < goal["target"])
    assert {"date", "git_commit", "device", "device_name", "versions"} <= set(figures)
    assert {"torch", "diffusers"} <= set(figures["versions"])
    for key in ("ddim_seconds", "nti_seconds", "nti_half_unet_seconds", "negative_prompt_seconds", "direct_seconds",
                "search_seconds_per_finding_first_accepted", "search_seconds_per_finding_none_accepted"):
        assert figures[key] > 0, key
    # nothing accepted: the search runs the whole grid, far more UNet work than stopping at the first candidate
    assert figures["search_unet_calls_per_finding_none_accepted"] > figures["search_unet_calls_per_finding_first_accepted"]
