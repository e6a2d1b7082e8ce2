"""Metric-guided search benchmark (issue 7): one pass vs. seed 000's Algorithm 1 vs. cyclex's search.

    python -m benchmarks.search [--steps 10] [--findings 40] [--tiny] [--out benchmarks/results/search.json]

All arms run in one process on one machine, on the same >= 40 phantom findings, with the same
reduced number of DDIM steps (`--steps`, default 10, to fit a shared 2-core CPU; the papers use 50),
the same scorer and the same acceptance rule (CF_Score >= `--required-score`, 5 as the paper, and
the cycle verified), over the same (checkpoint x strength x guidance) grid:
  (a) single_pass: default settings (best-L2 checkpoint, NTI default null, delta 1.0, omega 7.5);
  (b) algorithm1: seed 000's Algorithm 1 as written (H_null = the paper's two NTI settings,
      re-inverting at each setting);
  (c) cyclex_search: `MetricGuidedSearch` with the library's defaults (H_null = negative-prompt
      and direct inversion first, then the two NTI settings; one inversion per null x checkpoint, guidance
      batches, paper order, first accepted, cheap metrics before the generator);
  (c') cyclex_search_sequential: the same with guidance_batch_size=1 (one guidance per UNet batch,
      stopping at the first accepted);
  (c'') cyclex_search_p2p: (c) with prompt-to-prompt attention control on every candidate
      (`AttentionControlConfig()` defaults: refine, local blend; `--attention-control refine` in the CLI).
UNet evaluations are counted per batch item (`LatentDiffusion.unet_calls`; NTI's inner iterations
count one evaluation each, their backward passes are not counted); forward passes count batches.

The demo world (default) needs the assets other parts of cyclex build under $CYCLEX_HOME/demo:
the clean generator's tailored SD (`tailored/clean/` with selection.json: best_l2, best_l1; or --tailored PATH), the
demo generator "clean" and the phantom classifier (stand-in encoder, classifier and LPIPS
backbone). CF thresholds are calibrated once (`cyclex.demo.cf_thresholds`, version 2: true phantom
counterfactuals through the demo VAE) and stored as $CYCLEX_HOME/demo/cf_thresholds.json (shared
with `cyclex explain --variant nti --search`). `--tiny` runs the same code on tiny random
components (logic check only: numbers from random weights mean nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cyclex.atomic_io import write_text_atomic
from cyclex.counterfactuals.algorithm1 import algorithm1_search
from cyclex.counterfactuals.attention_control import AttentionControlConfig
from cyclex.counterfactuals.inversion_cache import InversionCache
from cyclex.counterfactuals.nti import NullTextInversionMaker
from cyclex.counterfactuals.search import DEFAULT_NULL_SETTINGS, MetricGuidedSearch
from cyclex.counterfactuals.search_maker import generator_cycle_check
from cyclex.counterfactuals.search_statistics import SearchSummary, ablation_tables
from cyclex.demo.cf_thresholds import thresholds_for
from cyclex.explain.scores import CFThresholds, CounterfactualScorer
from cyclex.explain.stand_in_lpips import StandInLPIPS
from cyclex.findings import StructuredPrompt

logger = logging.getLogger("benchmarks.search")

RESULTS = Path(__file__).parent / "results" / "search.json"
CHECKPOINTS = ("best_l2", "best_l1")
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 7.5
ARMS = ("single_pass", "algorithm1", "cyclex_search", "cyclex_search_sequential", "cyclex_search_p2p")
CYCLEX_ARMS = {"cyclex_search": "", "cyclex_search_sequential": "_sequential", "cyclex_search_p2p": "_p2p"}


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
    cycle_check: Any
    requests: list[Request]
    thresholds: CFThresholds
    description: dict[str, Any] = field(default_factory=dict)


def phantom_requests(n_findings: int, findings_of, seed: int = 0, template: str = "cvlm") -> list[Request]:
    """One request per present finding of successive phantoms until n_findings are collected."""
    from cyclex.datasets.phantom import make_phantom, phantom_seed

    requests: list[Request] = []
    i = 0
    while len(requests) < n_findings:
        s = phantom_seed(seed, i)
        i += 1
        if i > 50 * n_findings:
            raise RuntimeError(f"only {len(requests)} findings in {i} phantoms; is the generator reporting findings?")
        phantom = make_phantom(s)
        image = torch.from_numpy(phantom.image).float()[None]
        present = findings_of(phantom, image)
        prompt = StructuredPrompt(present, template=template)
        for finding in present:
            requests.append(Request(image, prompt.text, prompt.remove(finding).text, finding, s))
    return requests[:n_findings]


def demo_world(n_findings: int, tailored: Path | None) -> World:
    from cyclex.demo.cache import demo_cache_dir
    from cyclex.demo.generators import demo_generator_path
    from cyclex.demo.phantom_classifier import load_phantom_classifier
    from cyclex.labelers import RuleLabeler
    from cyclex.specs.generators import load_generator
    from cyclex.tailored_training import load_tailored_pipeline, read_tailored_metadata

    demo = demo_cache_dir()
    tailored = tailored or demo / "tailored" / "clean"
    if not (tailored / "selection.json").is_file():
        raise FileNotFoundError(f"no tailored SD at {tailored} (selection.json missing); pass --tailored PATH or --tiny")
    classifier = load_phantom_classifier(train_if_missing=False)
    generator = load_generator("hf:" + str(demo_generator_path("clean", train_if_missing=False)))
    labeler = RuleLabeler()
    metadata = read_tailored_metadata(tailored)
    uncertain = bool(metadata.get("uncertain_as_present", True))
    scorer = CounterfactualScorer(classifier, classifier, lpips=StandInLPIPS(classifier.net, classifier.config.image_size))
    scorer.thresholds = thresholds_for(scorer, demo / "cf_thresholds.json")
    pipes = {c: load_tailored_pipeline(tailored, checkpoint=c, dtype=torch.float32) for c in CHECKPOINTS}

    def findings_of(_phantom, image):
        return list(labeler.label(generator.generate(image[None]))[0].present(uncertain))

    requests = phantom_requests(n_findings, findings_of, template=metadata.get("prompt_template", "cvlm"))
    return World(pipes, scorer, generator_cycle_check(generator, labeler, uncertain), requests, scorer.thresholds,
                 {"world": "demo", "tailored": str(tailored), "generator": "demo:clean"})


def tiny_world(n_findings: int) -> World:
    """Tiny random SD (two 'checkpoints' = two seeds), random stand-in classifier; logic check only."""
    from cyclex.demo.phantom_classifier import (
        PhantomClassifier,
        PhantomClassifierConfig,
        PhantomClassifierNet,
    )
    from cyclex.demo.tiny_sd import TinySDConfig, tiny_sd_pipeline

    torch.manual_seed(0)
    config = PhantomClassifierConfig()
    classifier = PhantomClassifier(PhantomClassifierNet(config), config)
    scorer = CounterfactualScorer(classifier, classifier, lpips=StandInLPIPS(classifier.net, config.image_size))
    scorer.thresholds = thresholds_for(scorer, None)
    pipes = {c: tiny_sd_pipeline(TinySDConfig(seed=i)) for i, c in enumerate(CHECKPOINTS)}

    def cycle_check(images, findings):  # the stand-in classifier's logit drops below 0
        from cyclex.explain.effectiveness import target_logits

        return [bool(target_logits(classifier, images[k:k + 1], f)[0] < 0) for k, f in enumerate(findings)]

    requests = phantom_requests(n_findings, lambda phantom, _image: sorted(phantom.findings_meta))
    return World(pipes, scorer, cycle_check, requests, scorer.thresholds, {"world": "tiny-random"})


def nti_makers(world: World, steps: int, inversion_guidance: float | None = None,
               attention_control: AttentionControlConfig | None = None) -> dict[str, NullTextInversionMaker]:
    cache = InversionCache()  # fresh per arm: no arm profits from another's inversions
    return {
        c: NullTextInversionMaker(pipe, steps, guidance_scale=DEFAULT_GUIDANCE, checkpoint=c, cache=cache,
                                  inversion_guidance=inversion_guidance, attention_control=attention_control)
        for c, pipe in world.pipes.items()
    }


def run_arm(name: str, world: World, steps: int, grid: dict[str, tuple]) -> tuple[dict, list]:
    results = []
    start = time.perf_counter()
    if name.startswith("cyclex_search"):
        makers = nti_makers(world, steps, inversion_guidance=float(min(grid["guidances"])),
                            attention_control=AttentionControlConfig() if name == "cyclex_search_p2p" else None)
        if name == "cyclex_search_sequential":  # one guidance per batch, stopping at the first accepted
            grid = {**grid, "guidance_batch_size": 1}
        search = MetricGuidedSearch(makers, world.scorer, world.cycle_check, **grid)
        for r in world.requests:
            results.append(search.search(r.image, r.source_prompt, r.target_prompt, r.finding))
    else:
        makers = nti_makers(world, steps)
        arm_grid = grid if name == "algorithm1" else {
            "null_settings": ("default",), "checkpoints": (CHECKPOINTS[0],), "strengths": (1.0,),
            "guidances": (DEFAULT_GUIDANCE,), "required_score": grid["required_score"],
        }
        for r in world.requests:
            results.append(algorithm1_search(makers, world.scorer, world.cycle_check, r.image, r.source_prompt,
                                             r.target_prompt, r.finding, **arm_grid))
    summary = SearchSummary.from_results(results).to_dict()
    summary["wall_seconds"] = time.perf_counter() - start
    logger.info("%s: %s", name, {k: summary[k] for k in ("acceptance_rate", "unet_calls_per_accepted", "n_findings")})
    return summary, results


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run(world: World, steps: int, grid: dict[str, tuple], cyclex_grid: dict[str, tuple] | None = None,
        arms: tuple[str, ...] = ARMS) -> dict[str, Any]:
    cyclex_grid = cyclex_grid or grid
    out: dict[str, Any] = {
        "benchmark": "search",
        "steps": steps,
        "note": (f"all arms use the same reduced DDIM steps and the same acceptance (CF_Score >= "
                 f"{grid['required_score']} and cycle verified)"),
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                    "device": "cpu", "torch": torch.__version__},
        "world": world.description,
        "thresholds": asdict(world.thresholds),
        "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
        "grid_cyclex_search": {k: list(v) if isinstance(v, tuple) else v for k, v in cyclex_grid.items()},
    }
    attempts = {}
    for name in arms:
        out[name], results = run_arm(name, world, steps, cyclex_grid if name.startswith("cyclex_search") else grid)
        attempts[name] = [r.attempts for r in results]
    for name in arms:
        out[f"ablation_{name}"] = ablation_tables(attempts[name], grid["required_score"])
    if set(arms) != set(ARMS):
        return out  # a partial run (exploration): no ratios or goals
    for arm, suffix in CYCLEX_ARMS.items():
        for measure in ("unet_calls", "unet_passes", "seconds"):
            out[f"{measure}_ratio_cyclex{suffix}_vs_algorithm1"] = ratio(out[arm][f"{measure}_per_accepted"],
                                                                        out["algorithm1"][f"{measure}_per_accepted"])
        # whole-run cost ratios (defined even when an arm accepts nothing)
        for measure in ("unet_calls", "unet_passes"):
            out[f"{measure}_total_ratio_cyclex{suffix}_vs_algorithm1"] = ratio(out[arm][f"{measure}_total"],
                                                                              out["algorithm1"][f"{measure}_total"])
    a, s = out["algorithm1"]["acceptance_rate"], out["single_pass"]["acceptance_rate"]
    out["goals"] = {}
    for arm, suffix in CYCLEX_ARMS.items():
        c = out[arm]["acceptance_rate"]
        out["goals"].update({
            f"cyclex{suffix}_acceptance_ge_algorithm1": c >= a,
            f"cyclex{suffix}_acceptance_ge_2x_single_pass": c >= 2 * s,
            f"cyclex{suffix}_unet_calls_le_tenth_of_algorithm1":
                (out[f"unet_calls_ratio_cyclex{suffix}_vs_algorithm1"] or 1.0) <= 0.1,
            f"cyclex{suffix}_unet_passes_le_tenth_of_algorithm1":
                (out[f"unet_passes_ratio_cyclex{suffix}_vs_algorithm1"] or 1.0) <= 0.1,
        })
    out["gpu"] = None  # filled only when a session measured on a GPU machine
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps for every arm")
    parser.add_argument("--findings", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="tiny random components (logic check)")
    parser.add_argument("--tailored", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.9, 0.8])
    parser.add_argument("--guidances", type=float, nargs="+", default=[7, 8, 9, 10])
    parser.add_argument("--null-settings", nargs="+", default=["default", "underfit"],
                        help="H_null of Algorithm 1 (the paper's two NTI settings)")
    parser.add_argument("--cyclex-null-settings", nargs="+", default=None,
                        help="H_null of cyclex's search (default: the library's, cheap inversions first)")
    parser.add_argument("--guidance-batch-size", type=int, default=None,
                        help="cyclex search: guidances per UNet batch (default: all in one batch)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared CPU)")
    parser.add_argument("--required-score", type=int, default=5, help="CF_Score needed to accept (0..5)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    world = tiny_world(args.findings) if args.tiny else demo_world(args.findings, args.tailored)
    grid = {"null_settings": tuple(args.null_settings), "checkpoints": CHECKPOINTS,
            "strengths": tuple(args.strengths), "guidances": tuple(args.guidances),
            "required_score": args.required_score}
    cyclex_grid = dict(grid)
    cyclex_grid["null_settings"] = tuple(args.cyclex_null_settings or DEFAULT_NULL_SETTINGS)
    if args.guidance_batch_size:
        cyclex_grid["guidance_batch_size"] = args.guidance_batch_size
    result = run(world, args.steps, grid, cyclex_grid, tuple(args.arms))
    if args.out.is_file():  # GPU figures come from another machine (search_gpu.py): keep them
        result["gpu"] = json.loads(args.out.read_text()).get("gpu") or result.get("gpu")
    write_text_atomic(args.out, json.dumps(result, indent=2, default=str))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
