"""Metric-guided search benchmark (issues 7, 16): seed 000's Algorithm 1 vs cyclex's search, same grid.

    python -m benchmarks.search [--findings 200] [--steps 5] [--strengths 1.0 0.8] [--guidances 7 10]
                                [--max-minutes 40] [--resume] [--tiny] [--out benchmarks/results/search.json]

Every arm runs in one process, finding after finding (all arms on finding i before finding i + 1, so
a run stopped by `--max-minutes` leaves every arm with the same findings), on held-out query phantoms
(the seed registry's search-benchmark range; no shipped model, threshold or setting was trained,
calibrated or tuned on them), with the same reduced DDIM steps, the same scorer and the same
acceptance (CF_Score >= `--required-score`, 5 as the paper, and the cycle verified):
  (a) algorithm1: seed 000's Algorithm 1 as written: H_null x checkpoints x strengths x guidances in
      the written order, re-inverting at every setting (null-text inversion fitted at the sampling omega);
  (b) cyclex_search: `MetricGuidedSearch` on the same grid and the same method
      (`fit_null_per_guidance=True`: one null-text fit per null setting, checkpoint and guidance, as
      Algorithm 1, shared across strengths and across the findings of one image; the guidance-1 pivot
      shared by everything), paper order, first accepted, cheap metrics before the generator. Its
      candidates are Algorithm 1's, so its savings come only from sharing, ordering and stopping early;
  (c) negative_prompt_search / direct_search: the same checkpoints, strengths and guidances with the
      optimisation-free inversions as the only null setting (other methods, reported as their own arms);
  (d) single_pass: Algorithm 1's first attempt (the grid's first setting), read from its log: a single
      pass at that setting gives the same counterfactual, so it is not run again.
Optional arms (`--arms`): cyclex_search_shared_null_fit (null-text inversion fitted once per null
setting at the lowest guidance and reused for the others: an approximation, not Algorithm 1's method)
and cyclex_search_library_default (what `cyclex explain --search` does: the fast inversions first, then
the shared-fit null-text settings).

UNet evaluations are counted per batch item (`LatentDiffusion.unet_calls`; NTI's inner iterations
count one each, their backward passes are not counted); forward passes count batches; seconds are
wall seconds of the search (scoring and cycle checks included) at the thread count in `machine`.
Every rate has a percentile-bootstrap 95 % interval over findings (2000 resamples, seed 0); every arm
is compared with Algorithm 1 on the same findings (paired difference of acceptance and paired cost
ratios, with intervals).

Runs start fresh (the per-finding log benchmarks/.work/search/findings.jsonl is deleted first);
`--resume` continues an interrupted run only when its settings, its weights' sha256 fingerprint and
the cyclex version are unchanged. GPU figures are not written here (benchmarks/search_gpu.py writes
benchmarks/results/search_gpu.json on a GPU machine).

The demo world (default) uses the demo assets under $CYCLEX_HOME/demo (installed from the shipped
weights when missing): the clean generator's tailored SD, the demo generator "clean" (report
generator of the cycle check), the phantom classifier, which is the CPG classifier and, as
phantom-world stand-ins, the encoder of the "CLIP" criterion and the feature network of the
"LPIPS" criterion (`provenance.scorers` says so), and the shipped CF thresholds. `--tiny` runs the
same code on tiny random components (logic check only: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cyclex.atomic_io import write_text_atomic
from cyclex.counterfactuals.algorithm1 import algorithm1_search
from cyclex.counterfactuals.inversion_cache import InversionCache
from cyclex.counterfactuals.nti import NullTextInversionMaker
from cyclex.counterfactuals.search import DEFAULT_NULL_SETTINGS, MetricGuidedSearch, SearchResult
from cyclex.counterfactuals.search_maker import generator_cycle_check
from cyclex.counterfactuals.search_statistics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ablation_tables,
    bootstrap_mean_ci,
    paired_difference_ci,
    paired_ratio_ci,
)
from cyclex.explain.scores import CFThresholds, CounterfactualScorer
from cyclex.explain.stand_in_lpips import StandInLPIPS
from cyclex.findings import StructuredPrompt
from cyclex.jsonl import read_jsonl, to_json_safe
from cyclex.provenance import (
    STAND_IN_ENCODER,
    STAND_IN_LPIPS,
    cyclex_version,
    environment,
    file_sha256,
    files_sha256,
)

logger = logging.getLogger("benchmarks.search")

RESULTS = Path(__file__).parent / "results" / "search.json"
WORK = Path(__file__).parent / ".work" / "search"
FORMAT = 2  # of findings.jsonl / run.json: a resume across formats is refused
# Reduced defaults that fit 200 findings x every arm into ~40 minutes of one shared CPU core (the
# papers use 50 steps and delta {1.0, 0.9, 0.8} x omega {7, 8, 9, 10}); the same for every arm.
DEFAULT_STEPS = 4
DEFAULT_STRENGTHS = (1.0, 0.8)
DEFAULT_GUIDANCES = (7.0, 10.0)
DEFAULT_NULL_SETTINGS_ALGORITHM1 = ("default", "underfit")  # the paper's H_null
# The demo's tailored SD selects checkpoint-003000 for both best-L2 and best-L1 (selection.json): the
# checkpoint dimension has one distinct value there, so the default grid searches it once.
DEFAULT_CHECKPOINTS = ("best_l2",)
DEFAULT_ARMS = ("algorithm1", "cyclex_search", "negative_prompt_search", "direct_search")
OPTIONAL_ARMS = ("cyclex_search_shared_null_fit", "cyclex_search_library_default")
BASELINE = "algorithm1"
DERIVED_ARM = "single_pass"  # Algorithm 1's first attempt


@dataclass
class Request:
    image: torch.Tensor  # (1, H, W) in [0, 1]
    source_prompt: str
    target_prompt: str
    finding: str
    phantom_seed: int


@dataclass
class World:
    pipes: dict[str, Any]
    scorer: CounterfactualScorer
    cycle_check: Callable
    requests: list[Request]
    thresholds: CFThresholds
    description: dict[str, Any] = field(default_factory=dict)
    scorers: dict[str, Any] = field(default_factory=dict)  # provenance of every scorer
    weight_files: list[Path] = field(default_factory=list)  # what the fingerprint hashes


@dataclass(frozen=True)
class Grid:
    """The one (null settings x checkpoints x strengths x guidances) grid every arm searches."""

    null_settings: tuple
    checkpoints: tuple[str, ...]
    strengths: tuple[float, ...]
    guidances: tuple[float, ...]
    required_score: int = 5

    def search_kwargs(self) -> dict[str, Any]:
        return {"checkpoints": self.checkpoints, "strengths": self.strengths, "guidances": self.guidances,
                "required_score": self.required_score}


@dataclass(frozen=True)
class Arm:
    name: str
    null_settings: tuple
    method: str  # what the arm is, in words (written into the results)
    algorithm1: bool = False
    fit_null_per_guidance: bool = True


def arms_for(grid: Grid) -> dict[str, Arm]:
    same = "the same null settings, checkpoints, strengths and guidances"
    return {a.name: a for a in (
        Arm(BASELINE, grid.null_settings, "seed 000's Algorithm 1 as written: re-inverts at every setting, "
            "null-text inversion fitted at the sampling guidance", algorithm1=True),
        Arm("cyclex_search", grid.null_settings, f"MetricGuidedSearch on {same} and the same method as Algorithm 1 "
            "(null-text fit per guidance, shared across strengths and an image's findings; paper order; first "
            "accepted)"),
        Arm("negative_prompt_search", ("negative-prompt",), "MetricGuidedSearch with negative-prompt inversion as "
            "the only null setting (another method: no null-text optimisation)"),
        Arm("direct_search", ("direct",), "MetricGuidedSearch with direct inversion as the only null setting "
            "(another method: no null-text optimisation)"),
        Arm("cyclex_search_shared_null_fit", grid.null_settings, "MetricGuidedSearch, null-text inversion fitted "
            "once at the lowest guidance and reused for the others (an approximation of Algorithm 1's method)",
            fit_null_per_guidance=False),
        Arm("cyclex_search_library_default", DEFAULT_NULL_SETTINGS, "what `cyclex explain --search` does: "
            "negative-prompt and direct inversion first, then the null-text settings fitted once",
            fit_null_per_guidance=False),
    )}


# -- queries -------------------------------------------------------------------------------------
def phantom_requests(n_findings: int, findings_of, seeds: Iterable[int], template: str = "cvlm") -> list[Request]:
    """One request per present finding of the phantoms `seeds` (in order) until n_findings are collected."""
    from cyclex.datasets.phantom import make_phantom

    requests: list[Request] = []
    n_phantoms = 0
    for s in seeds:
        if len(requests) >= n_findings:
            break
        n_phantoms += 1
        phantom = make_phantom(int(s))
        image = torch.from_numpy(phantom.image).float()[None]
        present = findings_of(phantom, image)
        prompt = StructuredPrompt(present, template=template)
        for finding in present:
            requests.append(Request(image, prompt.text, prompt.remove(finding).text, finding, int(s)))
    if len(requests) < n_findings:
        raise RuntimeError(f"only {len(requests)} findings in the {n_phantoms} query phantoms; "
                           f"{n_findings} were asked for (is the generator reporting findings?)")
    return requests[:n_findings]


def query_seed_ranges() -> list[list[int]]:
    """[[start, stop)] the search benchmark may draw its held-out queries from (the seed registry's block)."""
    from cyclex.datasets.seed_registry import SEARCH_BENCHMARK_QUERIES

    return [list(r) for r in SEARCH_BENCHMARK_QUERIES.ranges]


def seed_ranges_by_purpose() -> dict[str, Any]:
    """The registry's training and validation ranges (merged, and per use) to write beside the queries."""
    from cyclex.datasets.seed_registry import SEED_USES, TRAINING, VALIDATION, ranges_of

    return {"training_seeds": ranges_of(TRAINING), "validation_seeds": ranges_of(VALIDATION),
            "training_seed_uses": {u.name: u.ranges for u in SEED_USES if u.purpose == TRAINING}}


def drawn_query_ranges_of_seeds(seeds: Iterable[int]) -> list[list[int]]:
    """[[start, stop)] of the query phantoms used, checked against every training and validation use."""
    from cyclex.datasets.seed_registry import check_held_out, merge_ranges

    return check_held_out(merge_ranges([s, s + 1] for s in seeds), "search benchmark queries")


def seeds_of(ranges: Sequence[Sequence[int]]) -> Iterator[int]:
    return (s for start, stop in ranges for s in range(int(start), int(stop)))


# -- worlds --------------------------------------------------------------------------------------
def demo_world(n_findings: int, tailored: Path | None, checkpoints: Sequence[str]) -> World:
    from cyclex.demo.cache import demo_cache_dir
    from cyclex.demo.cf_thresholds import thresholds_for
    from cyclex.demo.generators import demo_generator_path
    from cyclex.demo.packaged import install_packaged_assets
    from cyclex.demo.phantom_classifier import load_phantom_classifier
    from cyclex.labelers import RuleLabeler
    from cyclex.specs.generators import load_generator
    from cyclex.tailored_training import load_tailored_pipeline, read_tailored_metadata

    install_packaged_assets()
    demo = demo_cache_dir()
    tailored = tailored or demo / "tailored" / "clean"
    if not (tailored / "selection.json").is_file():
        raise FileNotFoundError(f"no tailored SD at {tailored} (selection.json missing); pass --tailored PATH or --tiny")
    selection = json.loads((tailored / "selection.json").read_text())
    missing = [c for c in checkpoints if c not in selection]
    if missing:
        raise ValueError(f"{tailored / 'selection.json'} names no checkpoint {missing}; it has {sorted(selection)}")
    classifier = load_phantom_classifier(train_if_missing=False)
    generator_dir = demo_generator_path("clean", train_if_missing=False)
    generator = load_generator("hf:" + str(generator_dir))
    labeler = RuleLabeler()
    metadata = read_tailored_metadata(tailored)
    uncertain = bool(metadata.get("uncertain_as_present", True))
    scorer = CounterfactualScorer(classifier, classifier, lpips=StandInLPIPS(classifier.net, classifier.config.image_size))
    thresholds_path = demo / "cf_thresholds.json"
    scorer.thresholds = thresholds_for(scorer, thresholds_path)
    pipes = {c: load_tailored_pipeline(tailored, checkpoint=c, dtype=torch.float32) for c in checkpoints}
    classifier_dir = demo / "classifier"

    def findings_of(_phantom, image):
        return list(labeler.label(generator.generate(image[None]))[0].present(uncertain))

    requests = phantom_requests(n_findings, findings_of, seeds_of(query_seed_ranges()),
                                template=metadata.get("prompt_template", "cvlm"))
    classifier_weights = classifier_dir / "model.safetensors"
    classifier_sha = file_sha256(classifier_weights)
    scorers = {
        "cpg_classifier": {"name": "phantom classifier (cyclex.demo.phantom_classifier), trained on phantoms",
                           "weights": str(classifier_weights), "weights_sha256": classifier_sha},
        "clip_criterion": {"name": STAND_IN_ENCODER + "; the same network as the CPG classifier, so CPG and FET "
                                   "are not independent", "stand_in": True, "weights_sha256": classifier_sha,
                           "threshold": scorer.thresholds.clip, "threshold_note": "calibrated for this encoder, "
                           "not CLIP's 0.92"},
        "lpips": {"name": STAND_IN_LPIPS + " (cyclex.explain.stand_in_lpips.StandInLPIPS), not LPIPS AlexNet/VGG",
                  "stand_in": True, "weights_sha256": classifier_sha},
        "cf_thresholds": {"file": str(thresholds_path), "sha256": file_sha256(thresholds_path),
                          "rule": "calibrated on true phantom counterfactuals through the demo VAE "
                                  "(cyclex.demo.cf_thresholds)", **asdict(scorer.thresholds)},
        "cycle_check": {"generator": "demo:clean", "weights_sha256": file_sha256(generator_dir / "model.safetensors"),
                        "labeler": "RuleLabeler", "uncertain_as_present": uncertain},
        "counterfactual_sd": {"tailored": str(tailored), "unet_sha256": files_sha256(
            [tailored / selection[c] for c in checkpoints], root=tailored)},
    }
    unets = sorted({tailored / selection[c] for c in checkpoints})
    weight_files = [p for folder in (*unets, tailored / "vae", tailored / "text_encoder", classifier_dir, generator_dir)
                    for p in sorted(folder.rglob("*.safetensors"))] + [thresholds_path]
    description = {"world": "demo", "tailored": str(tailored), "generator": "demo:clean",
                   "checkpoints": {c: selection[c] for c in checkpoints},
                   "checkpoint_note": "best_l1 and best_l2 both select " + selection.get("best_l2", "?")
                   if selection.get("best_l1") == selection.get("best_l2") else ""}
    return World(pipes, scorer, generator_cycle_check(generator, labeler, uncertain), requests, scorer.thresholds,
                 description, scorers, weight_files)


def tiny_world(n_findings: int, checkpoints: Sequence[str]) -> World:
    """Tiny random SD (one seed per 'checkpoint'), random stand-in classifier; logic check only."""
    from cyclex.demo.cf_thresholds import thresholds_for
    from cyclex.demo.phantom_classifier import (
        PhantomClassifier,
        PhantomClassifierConfig,
        PhantomClassifierNet,
    )
    from cyclex.demo.tiny_sd import TinySDConfig, tiny_sd_pipeline
    from cyclex.explain.effectiveness import target_logits

    torch.manual_seed(0)
    config = PhantomClassifierConfig()
    classifier = PhantomClassifier(PhantomClassifierNet(config), config)
    scorer = CounterfactualScorer(classifier, classifier, lpips=StandInLPIPS(classifier.net, config.image_size))
    scorer.thresholds = thresholds_for(scorer, None)
    pipes = {c: tiny_sd_pipeline(TinySDConfig(seed=i)) for i, c in enumerate(checkpoints)}

    def cycle_check(images, findings):  # the stand-in classifier's logit drops below 0
        return [bool(target_logits(classifier, images[k:k + 1], f)[0] < 0) for k, f in enumerate(findings)]

    requests = phantom_requests(n_findings, lambda phantom, _image: sorted(phantom.findings_meta),
                                seeds_of(query_seed_ranges()))
    scorers = {name: {"name": "tiny random stand-in (logic check)"}
               for name in ("cpg_classifier", "clip_criterion", "lpips", "cycle_check")}
    return World(pipes, scorer, cycle_check, requests, scorer.thresholds, {"world": "tiny-random"}, scorers, [])


# -- provenance ----------------------------------------------------------------------------------
def weights_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the weight files' names and contents: a resume across other weights is refused."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).name.encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


# -- arms ----------------------------------------------------------------------------------------
class ArmRunner:
    """One arm's makers and search, kept across findings (its own inversion cache, shared by nothing else)."""

    def __init__(self, arm: Arm, world: World, grid: Grid, steps: int) -> None:
        self.arm = arm
        self.world = world
        self.grid = grid
        cache = InversionCache(max_items=4096)  # fresh per arm: no arm profits from another's inversions
        lowest = float(min(grid.guidances))
        self.makers = {
            c: NullTextInversionMaker(pipe, steps, guidance_scale=lowest, checkpoint=c, cache=cache,
                                      inversion_guidance=lowest)
            for c, pipe in world.pipes.items() if c in grid.checkpoints
        }
        self.search = None if arm.algorithm1 else MetricGuidedSearch(
            self.makers, world.scorer, world.cycle_check, null_settings=arm.null_settings,
            fit_null_per_guidance=arm.fit_null_per_guidance, **grid.search_kwargs())

    def run(self, r: Request) -> SearchResult:
        if self.search is not None:
            return self.search.search(r.image, r.source_prompt, r.target_prompt, r.finding)
        return algorithm1_search(self.makers, self.world.scorer, self.world.cycle_check, r.image, r.source_prompt,
                                 r.target_prompt, r.finding, null_settings=self.arm.null_settings,
                                 **self.grid.search_kwargs())


def finding_record(index: int, arm: str, r: Request, result: SearchResult) -> dict[str, Any]:
    return to_json_safe({"index": index, "arm": arm, "phantom_seed": r.phantom_seed, **result.summary(),
                         "attempts": result.attempts})


def single_pass_record(record: dict[str, Any]) -> dict[str, Any]:
    """Algorithm 1's first attempt as a one-setting arm (a single pass there makes the same counterfactual)."""
    first = record["attempts"][0]
    return {"index": record["index"], "arm": DERIVED_ARM, "phantom_seed": record["phantom_seed"],
            "finding": record["finding"], "accepted": bool(first["accepted"]), "verified": first["verified"],
            "score": first["score"], "unet_calls": first["unet_calls"], "unet_passes": first.get("unet_passes", 0),
            "seconds": first["seconds"], "n_attempts": 1, "attempts": [first],
            "setting": {k: first[k] for k in ("null_setting", "checkpoint", "strength", "guidance")}}


def arm_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Acceptance with its interval; UNet evaluations, forward passes and seconds per finding and per accepted."""
    n = len(records)
    accepted = [float(r["accepted"]) for r in records]
    out: dict[str, Any] = {
        "n_findings": n,
        "n_accepted": int(sum(accepted)),
        "acceptance_rate": sum(accepted) / n,
        "acceptance_ci95": bootstrap_mean_ci(accepted),
        "mean_score": sum(r["score"] for r in records) / n,
    }
    for measure in ("unet_calls", "unet_passes", "seconds"):
        values = [float(r[measure]) for r in records]
        out[f"{measure}_per_finding"] = sum(values) / n
        out[f"{measure}_per_finding_ci95"] = bootstrap_mean_ci(values)
        out[f"{measure}_per_accepted"] = sum(values) / out["n_accepted"] if out["n_accepted"] else None
        out[f"{measure}_total"] = sum(values)
    out["accepted_by_null_setting"] = {}
    for r in records:
        if r["accepted"]:
            key = str(r["setting"]["null_setting"])
            out["accepted_by_null_setting"][key] = out["accepted_by_null_setting"].get(key, 0) + 1
    return out


def paired_comparison(arm: Sequence[dict], baseline: Sequence[dict]) -> dict[str, Any]:
    """An arm against the baseline on the same findings: acceptance difference, cost ratios."""
    if [r["index"] for r in arm] != [r["index"] for r in baseline]:
        raise ValueError("paired comparison needs both arms on the same findings in the same order")
    out: dict[str, Any] = {"acceptance_difference": paired_difference_ci([r["accepted"] for r in arm],
                                                                         [r["accepted"] for r in baseline])}
    for measure in ("unet_calls", "unet_passes", "seconds"):
        out[f"{measure}_ratio"] = paired_ratio_ci([r[measure] for r in arm], [r[measure] for r in baseline])
    return out


def summarise(records_by_arm: dict[str, list[dict]], grid: Grid) -> dict[str, Any]:
    """Per-arm summaries, ablation tables and paired comparisons with Algorithm 1 (the results' body)."""
    out: dict[str, Any] = {"arms": {}, "paired_vs_algorithm1": {}, "ablation": {}}
    for name, records in records_by_arm.items():
        out["arms"][name] = arm_summary(records)
        out["ablation"][name] = ablation_tables([r["attempts"] for r in records], grid.required_score)
    if BASELINE in records_by_arm:
        for name, records in records_by_arm.items():
            if name != BASELINE:
                out["paired_vs_algorithm1"][name] = paired_comparison(records, records_by_arm[BASELINE])
    return out


# -- the run -------------------------------------------------------------------------------------
def run_settings(args: argparse.Namespace, grid: Grid, arm_names: Sequence[str]) -> dict[str, Any]:
    return to_json_safe({"world": "tiny" if args.tiny else "demo", "tailored": args.tailored, "steps": args.steps,
                         "findings": args.findings, "grid": asdict(grid), "arms": list(arm_names)})


def start_work(work: Path, identity: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """Fresh: empty the work folder. Resume: the records so far, after checking the run is the same one."""
    run_file, log = work / "run.json", work / "findings.jsonl"
    if resume:
        if not run_file.is_file():
            raise SystemExit(f"--resume: no earlier run at {run_file}; run without --resume")
        earlier = json.loads(run_file.read_text())
        for key in ("format", "cyclex_version", "weights_fingerprint", "settings"):
            if earlier.get(key) != identity[key]:
                raise SystemExit(f"--resume refused: {key} differs from the earlier run's ({run_file}): "
                                 f"{earlier.get(key)!r} != {identity[key]!r}; run without --resume")
        return read_jsonl(log, skip_unreadable=True) if log.is_file() else []
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_file, json.dumps(identity, indent=2))
    return []


def run(world: World, grid: Grid, steps: int, arm_names: Sequence[str], work: Path, identity: dict[str, Any],
        resume: bool = False, max_seconds: float | None = None) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Every arm on every request, finding by finding; returns the records by arm and how the run ended."""
    arms = arms_for(grid)
    records = start_work(work, identity, resume)
    done = {(r["index"], r["arm"]) for r in records}
    runners = {name: ArmRunner(arms[name], world, grid, steps) for name in arm_names}
    start = time.perf_counter()
    stopped = None
    with open(work / "findings.jsonl", "a") as log:
        for index, request in enumerate(world.requests):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                stopped = f"--max-minutes reached after {index} findings"
                logger.warning("%s", stopped)
                break
            for name, runner in runners.items():
                if (index, name) in done:
                    continue
                record = finding_record(index, name, request, runner.run(request))
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
            if index % 10 == 9:
                logger.info("%d findings in %.0f s", index + 1, time.perf_counter() - start)
    by_arm: dict[str, list[dict]] = {name: [] for name in arm_names}
    for record in sorted(records, key=lambda r: r["index"]):
        if record["arm"] in by_arm:
            by_arm[record["arm"]].append(record)
    complete = min(len(v) for v in by_arm.values())  # findings every arm finished
    by_arm = {name: v[:complete] for name, v in by_arm.items()}
    if BASELINE in by_arm:
        by_arm[DERIVED_ARM] = [single_pass_record(r) for r in by_arm[BASELINE]]
    return by_arm, {"wall_seconds_this_process": time.perf_counter() - start, "stopped": stopped,
                    "resumed": resume}


def results_document(world: World, grid: Grid, steps: int, by_arm: dict[str, list[dict]], ending: dict[str, Any],
                     identity: dict[str, Any], started: dict[str, Any]) -> dict[str, Any]:
    """The search.json document; `started`: `cyclex.provenance.environment()` when this process began."""
    arms = arms_for(grid)
    body = summarise(by_arm, grid)
    n = min(len(v) for v in by_arm.values())
    first_arm = next(iter(by_arm.values()))
    out: dict[str, Any] = {
        "benchmark": "search",
        "same_grid": True,
        "n_findings": n,
        "n_phantoms": len({r["phantom_seed"] for r in first_arm}),
        "query_seeds": drawn_query_ranges_of_seeds([r["phantom_seed"] for r in first_arm]),
        "query_seed_block": query_seed_ranges(),
        **seed_ranges_by_purpose(),
        "steps": steps,
        "grid": {**to_json_safe(asdict(grid)), "order": "Algorithm 1: as listed; cyclex: paper success shares"},
        "note": (f"every arm: {steps} DDIM steps (the papers use 50), the grid above, the same scorer and acceptance "
                 f"(CF_Score >= {grid.required_score} and the cycle verified), the same {n} held-out findings; "
                 "intervals: percentile bootstrap over findings"),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95, "unit": "finding"},
        "provenance": {"scorers": world.scorers, "weights_fingerprint": identity["weights_fingerprint"], **started},
        "world": world.description,
        "run": ending,
        "arm_methods": {name: arms[name].method for name in by_arm if name in arms} | {
            DERIVED_ARM: "Algorithm 1's first attempt (the grid's first setting), read from its attempt log"},
        **body,
    }
    if "cyclex_search" in by_arm and BASELINE in by_arm and n:
        paired = body["paired_vs_algorithm1"]["cyclex_search"]
        out["unet_calls_ratio_cyclex_vs_algorithm1"] = paired["unet_calls_ratio"]["ratio"]
        out["unet_passes_ratio_cyclex_vs_algorithm1"] = paired["unet_passes_ratio"]["ratio"]
        out["seconds_ratio_cyclex_vs_algorithm1"] = paired["seconds_ratio"]["ratio"]
        out["paired_acceptance_difference"] = paired["acceptance_difference"]["difference"]
        out["paired_acceptance_difference_ci95"] = paired["acceptance_difference"]["ci95"]
        out["goals"] = {  # issue 16: n >= 200; issue 23: acceptance not below Algorithm 1's at <= 0.1x its UNet work
            "n_findings_ge_200": n >= 200,
            "cyclex_acceptance_not_below_algorithm1": paired["acceptance_difference"]["ci95"][1] >= 0,
            "cyclex_unet_calls_le_tenth_of_algorithm1": (out["unet_calls_ratio_cyclex_vs_algorithm1"] or 1.0) <= 0.1,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps for every arm")
    parser.add_argument("--findings", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="tiny random components (logic check)")
    parser.add_argument("--tailored", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK, help="per-finding log (for --resume)")
    parser.add_argument("--strengths", type=float, nargs="+", default=list(DEFAULT_STRENGTHS))
    parser.add_argument("--guidances", type=float, nargs="+", default=list(DEFAULT_GUIDANCES))
    parser.add_argument("--checkpoints", nargs="+", default=list(DEFAULT_CHECKPOINTS))
    parser.add_argument("--null-settings", nargs="+", default=list(DEFAULT_NULL_SETTINGS_ALGORITHM1),
                        help="H_null of Algorithm 1 and of cyclex_search (the paper's two NTI settings)")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=DEFAULT_ARMS + OPTIONAL_ARMS)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared CPU)")
    parser.add_argument("--required-score", type=int, default=5, help="CF_Score needed to accept (0..5)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new finding after this long; the results cover the findings every arm finished")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --work (refused when settings, weights or the cyclex version differ)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = environment("cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    grid = Grid(tuple(args.null_settings), tuple(args.checkpoints), tuple(args.strengths), tuple(args.guidances),
                args.required_score)
    if BASELINE not in args.arms:
        parser.error(f"--arms must include {BASELINE}: every arm is compared with it")
    world = tiny_world(args.findings, grid.checkpoints) if args.tiny else demo_world(args.findings, args.tailored,
                                                                                      grid.checkpoints)
    drawn_query_ranges_of_seeds(r.phantom_seed for r in world.requests)  # refuses seeds used for training
    identity = {"format": FORMAT, "cyclex_version": cyclex_version(),
                "weights_fingerprint": weights_fingerprint(world.weight_files) if world.weight_files else "tiny-random",
                "settings": run_settings(args, grid, args.arms)}
    by_arm, ending = run(world, grid, args.steps, args.arms, args.work, identity, args.resume,
                         None if args.max_minutes is None else 60.0 * args.max_minutes)
    if not min(len(v) for v in by_arm.values()):
        raise SystemExit("no finding finished in every arm; nothing to write")
    result = results_document(world, grid, args.steps, by_arm, ending, identity, started)
    write_text_atomic(args.out, json.dumps(to_json_safe(result), indent=2))
    logger.info("wrote %s (%d findings)", args.out, result["n_findings"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
