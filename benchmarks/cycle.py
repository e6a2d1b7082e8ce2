"""The cycle on held-out phantoms with the plain DDIM maker (issue 5's benchmark), plus alternatives.

`python -m benchmarks.cycle [--n 200] [--steps 50] [--resume]` writes benchmarks/results/cycle.json.
Queries: the seed registry's `cycle_benchmark_queries` (cyclex.datasets.seed_registry; no shipped
model, threshold or setting was trained, calibrated or chosen on them; `query_seeds` and
`training_seeds` in the JSON are [start, stop) ranges of `make_phantom` seeds). Per demo generator:
- the Cyclic Rate overall and per finding, with its 95 % Wilson interval;
- the mean pixel ROC-AUC of the positive difference map against the true finding mask inside the
  chest box (over all items and over the verified ones, the maps cyclex keeps): the map cyclex saves,
  max(I - CF, 0) smoothed by the frame's 5 x 5 Gaussian (`pixel_auc_positive_diff`), and seed 000's
  raw max(I - CF, 0) (`pixel_auc_positive_diff_raw`), each with a bootstrap 95 % interval over items
  and beside the AUC the exact noise-free counterfactual gets on the same items (the query's sensor
  noise caps the raw map);
- on images with the shortcut marker, the Cardiomegaly items whose evidence lies on it, two ways:
  the frame's largest component overlaps the marker (`shortcut_marker_overlap_rate`), and the
  stricter: at least half of the raw positive map's top-5 % mass lies on it (`shortcut_marker_mass_rate`);
- the share of each positive map's mass outside the true chest box, averaged over items
  (`mass_outside_chest_box_mean`, raw map; `_smoothed` for the saved one): maps and frames are made
  on the whole image, so a shortcut outside the chest stays visible;
- the Cyclic Rate counting only removals that changed no other finding, and the time `cyclex demo`
  takes with its models cached (with the demo's own settings).
No learned scorer is involved: the truth is the phantoms' exact masks, the verdict the rule labeler's
(`provenance` names both, the frame-threshold rule, versions, commit and the sha256 of the weights).
Goals (issue 5): cyclic rate >= 0.7; clean pixel AUC >= 0.85; marker overlap >= 0.8 (shortcut),
<= 0.1 (clean); `goals_strict` repeats them for the raw AUC and the top-5 %-mass marker rule.
The headline is the issue's: plain DDIM, maps against the query (I - CF). `alternatives` repeats the
measures for other makers / difference references / guidances (VARIANT:REFERENCE[@OMEGA],
`--alternatives`; without @OMEGA the headline's omega); there the "positive difference map" is
max(R - CF, 0) when the reference is the reconstruction R. The headline runs at the demo's omega
(chosen on validation phantoms by benchmarks/demo_guidance.py); `ddim:query@7.5` is the paper's.
Runs live in benchmarks/.work/cycle, emptied at every start; `--resume` keeps them when the weights
and the cyclex version are unchanged (benchmarks/work_folder.py) and refuses otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from cyclex.datasets.seed_registry import CYCLE_BENCHMARK_QUERIES

RESULTS = Path(__file__).parent / "results" / "cycle.json"
WORK = Path(__file__).parent / ".work" / "cycle"
# held out (cyclex.datasets.seed_registry); set 7331, this benchmark's before issue 16, is retired to validation
BENCH_SEED = CYCLE_BENCHMARK_QUERIES.set_seed
# omega 1 (the demo's) leaves nothing to negative prompts and direct inversion: both act through guidance
DEFAULT_ALTERNATIVES = ("ddim:query@7.5", "ddim:reconstruction", "negative-prompt:query@7.5", "direct:query@7.5")
BOOTSTRAP_RESAMPLES = 2000


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines() if x.strip()]


def _raw_positive(run: Path, line: dict) -> np.ndarray:
    """Seed 000's raw map max(I - CF, 0), from the saved signed map."""
    return np.maximum(np.load(run / line["signed_npy"]), 0)


def pixel_aucs(run: Path, chest_boxes: dict[str, list[int] | None], verified_only: bool = False,
               raw: bool = False) -> dict[str, list[float]]:
    """Pixel ROC-AUC of each item's positive difference map against its true mask, per finding.

    verified_only: only the items whose cycle was verified (the counterfactuals cyclex keeps as evidence).
    raw: score seed 000's raw max(I - CF, 0) (from the saved signed map) instead of the map cyclex
    saves (smoothed by the run's map_blur).
    """
    from cyclex.explain.alignment import pixel_roc_auc

    per_finding: dict[str, list[float]] = {}
    for line in _lines(run):
        if not line.get("mask_png"):
            continue  # the generator reported a finding the phantom does not have: no truth to compare
        if verified_only and not line["verified"]:
            continue
        mask = cv2.imread(str(run / line["mask_png"]), cv2.IMREAD_GRAYSCALE) > 0
        positive = _raw_positive(run, line) if raw else np.load(run / line["positive_npy"])
        auc = pixel_roc_auc(positive, mask, chest_box=chest_boxes.get(line["image_id"]))
        if not math.isnan(auc):
            per_finding.setdefault(line["finding"], []).append(auc)
    return per_finding


def mass_outside_chest_box(run: Path, chest_boxes: dict[str, list[int] | None]) -> dict[str, list[float]]:
    """Per item, the share of its positive map's mass outside the true chest box: {"raw": [...], "smoothed": [...]}."""
    from cyclex.explain.evaluate_run import mass_outside_box

    shares: dict[str, list[float]] = {"raw": [], "smoothed": []}
    for line in _lines(run):
        box = chest_boxes.get(line["image_id"])
        for key, heat in (("raw", _raw_positive(run, line)), ("smoothed", np.load(run / line["positive_npy"]))):
            share = mass_outside_box(heat, box)
            if share is not None:
                shares[key].append(share)
    return shares


def ceiling_aucs(run: Path, phantoms: dict, config, map_blur: int) -> dict[str, float]:
    """The pixel AUCs a perfect counterfactual would get on the items of `run` that have a true mask.

    The perfect counterfactual is the same patient drawn without the finding and without sensor
    noise (no generative model reproduces the query's noise realisation): I - CF then holds the
    finding and the query's noise, which is what caps the raw map.
    """
    from dataclasses import replace

    from cyclex.datasets.phantom import to_uint8, without_finding
    from cyclex.explain.alignment import pixel_roc_auc
    from cyclex.explain.frames import difference_maps

    noise_free = replace(config, noise_std=0.0)
    scores: dict[str, list[float]] = {"smoothed": [], "raw": []}
    for line in _lines(run):
        if not line.get("mask_png"):
            continue
        phantom = phantoms[line["image_id"]]
        query = to_uint8(phantom.image).astype(np.float32) / 255  # what the engine reads from the PNG
        perfect = without_finding(phantom, line["finding"], noise_free).image
        mask = phantom.masks[line["finding"]]
        for key, blur in (("smoothed", map_blur), ("raw", 1)):
            auc = pixel_roc_auc(difference_maps(query, perfect, positive_blur=blur)[2], mask, chest_box=phantom.chest_box)
            if not math.isnan(auc):
                scores[key].append(auc)
    return {key: float(np.mean(v)) if v else None for key, v in scores.items()}


def bootstrap_mean_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """Percentile-bootstrap 95 % interval of the mean over items; None without values."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return None
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    return [float(v) for v in np.percentile(means, [2.5, 97.5])]


def _rate(k: int, n: int) -> dict:
    from cyclex.cycle.audit import wilson_interval

    interval = wilson_interval(k, n)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": list(interval) if interval else None}


def time_demo(steps: int) -> float:
    """Wall time of `cyclex demo` into a fresh folder, with the demo models already cached."""
    out = WORK / "demo"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cyclex", "demo", "--out", str(out), "--steps", str(steps)],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(variant: str, difference_reference: str, records: list, chest_boxes: dict, args, assets: dict,
            work: Path, truth: tuple[dict, object]) -> dict:
    """Explain `records` with each demo generator under one (variant, difference reference).

    truth: (phantoms by id, their PhantomConfig) for the exact counterfactuals of `ceiling_aucs`.
    """
    from cyclex.cycle.run_folder import read_results, run_explain
    from cyclex.demo.run_demo import shortcut_marker_overlap
    from cyclex.specs.generators import load_generator

    frame_threshold = args.frame_threshold if args.frame_threshold == "stable" else float(args.frame_threshold)
    generators = {}
    for name in assets:
        started = time.perf_counter()
        run = work / name
        summary = run_explain(load_generator(f"demo:{name}"), assets[name]["tailored"], records, run,
                              variant=variant, steps=args.steps, guidance=args.guidance, strength=args.strength,
                              frame_threshold=frame_threshold, frame_normalize=args.frame_normalize,
                              checkpoint=args.checkpoint, difference_reference=difference_reference, progress=False,
                              map_blur=args.map_blur, generator_spec=f"demo:{name}", labeler_spec="rules")
        aucs = pixel_aucs(run, chest_boxes)
        all_aucs = [a for values in aucs.values() for a in values]
        verified_aucs = [a for values in pixel_aucs(run, chest_boxes, verified_only=True).values() for a in values]
        raw = pixel_aucs(run, chest_boxes, raw=True)
        raw_aucs = [a for values in raw.values() for a in values]
        ceiling = ceiling_aucs(run, *truth, map_blur=args.map_blur)
        marker = shortcut_marker_overlap(run)
        outside = mass_outside_chest_box(run, chest_boxes)
        lines = read_results(run)
        cyclic = _rate(summary["n_verified"], summary["n"])
        targeted = sum(bool(x["verified"] and not x["collateral_added"] and not x["collateral_lost"]) for x in lines)
        without_collateral = _rate(targeted, len(lines))
        overlap = _rate(marker["n_overlapping"], marker["n_frames_with_marker"])
        mass = _rate(marker["n_mass_on_marker"], marker["n_frames_with_marker"])
        generators[name] = {
            "cyclic_rate": summary["cyclic_rate"],
            "cyclic_rate_ci95": cyclic["ci95"],
            "cyclic_rate_per_finding": {f: v["cyclic_rate"] for f, v in summary["per_finding"].items()},
            "n_per_finding": {f: v["n"] for f, v in summary["per_finding"].items()},
            "n_findings": summary["n"],
            "n_verified": summary["n_verified"],
            "pixel_auc_positive_diff": float(np.mean(all_aucs)) if all_aucs else None,
            "pixel_auc_positive_diff_ci95": bootstrap_mean_ci(all_aucs),
            "pixel_auc_positive_diff_per_finding": {f: float(np.mean(v)) for f, v in aucs.items()},
            "n_items_with_true_mask": len(all_aucs),
            # the same over verified cycles only: the maps cyclex keeps as the generator's evidence
            "pixel_auc_positive_diff_verified": float(np.mean(verified_aucs)) if verified_aucs else None,
            "n_verified_items_with_true_mask": len(verified_aucs),
            # seed 000's raw max(I - CF, 0), before the map_blur smoothing
            "pixel_auc_positive_diff_raw": float(np.mean(raw_aucs)) if raw_aucs else None,
            "pixel_auc_positive_diff_raw_ci95": bootstrap_mean_ci(raw_aucs),
            "pixel_auc_positive_diff_raw_per_finding": {f: float(np.mean(v)) for f, v in raw.items()},
            # what the exact noise-free counterfactual scores on the same items (ceiling_aucs)
            "pixel_auc_ceiling": ceiling["smoothed"],
            "pixel_auc_ceiling_raw": ceiling["raw"],
            "n_cardiomegaly_frames_with_marker": marker["n_frames_with_marker"],
            "shortcut_marker_overlap_rate": overlap["rate"],
            "shortcut_marker_overlap_ci95": overlap["ci95"],
            # stricter: >= half of the raw map's top-5 % mass on the marker
            "shortcut_marker_mass_rate": mass["rate"],
            "shortcut_marker_mass_ci95": mass["ci95"],
            "n_cardiomegaly_mass_on_marker": marker["n_mass_on_marker"],
            "mass_outside_chest_box_mean": float(np.mean(outside["raw"])) if outside["raw"] else None,
            "mass_outside_chest_box_ci95": bootstrap_mean_ci(outside["raw"]),
            "mass_outside_chest_box_mean_smoothed": float(np.mean(outside["smoothed"])) if outside["smoothed"] else None,
            "n_collateral_changes": sum(bool(x["collateral_added"] or x["collateral_lost"]) for x in lines),
            # verified with no other finding added or lost: the removal was targeted, not a wipe
            "cyclic_rate_without_collateral": without_collateral["rate"],
            "cyclic_rate_without_collateral_ci95": without_collateral["ci95"],
            # the items' own timings (generation, counterfactuals, frames)
            "seconds": round(sum(sum(x.get("timings", {}).values()) for x in lines), 1),
            "seconds_this_call": round(time.perf_counter() - started, 1),
        }
    return generators


def held_out_queries(n: int, seed: int, folder: Path) -> tuple[list, dict, tuple[dict, object]]:
    """n demo query phantoms of `seed` written to `folder`: (records, chest boxes by id, truth for `measure`).

    The records keep their chest box as `alignment_chest_box` only (as the demo's do): maps and
    frames are computed on the whole image (the marker lies outside the chest); the pixel AUC is
    restricted to the box afterwards.
    """
    from cyclex.datasets.phantom import read_phantom_folder
    from cyclex.demo.queries import demo_query_config, demo_query_phantoms, write_query_folder

    phantoms = demo_query_phantoms(n, seed=seed)
    records = read_phantom_folder(write_query_folder(phantoms, folder))
    chest_boxes = {record["id"]: record["alignment_chest_box"] for record in records}
    return records, chest_boxes, ({p.id: p for p in phantoms}, demo_query_config())


def goals_of(generators: dict, demo_seconds: float | None = None) -> dict:
    """Issue 5's goals (the rule benchmarks/demo_guidance.py chose the demo's omega by)."""
    clean, shortcut = generators.get("clean", {}), generators.get("shortcut", {})
    goals = {
        "cyclic_rate_clean_ge_0.7": (clean.get("cyclic_rate") or 0) >= 0.7,
        "cyclic_rate_shortcut_ge_0.7": (shortcut.get("cyclic_rate") or 0) >= 0.7,
        "pixel_auc_clean_ge_0.85": (clean.get("pixel_auc_positive_diff") or 0) >= 0.85,
        "shortcut_marker_overlap_ge_0.8": (shortcut.get("shortcut_marker_overlap_rate") or 0) >= 0.8,
        "clean_marker_overlap_le_0.1": (clean.get("shortcut_marker_overlap_rate") or 0) <= 0.1,
    }
    if demo_seconds is not None:
        goals["demo_under_300_s"] = demo_seconds < 300
    return goals


def strict_goals_of(generators: dict) -> dict:
    """The same goals with seed 000's raw map and the top-5 %-mass marker rule (issue 16, item 7)."""
    clean, shortcut = generators.get("clean", {}), generators.get("shortcut", {})
    return {
        # even the exact counterfactual scores pixel_auc_ceiling_raw on the raw map
        "pixel_auc_raw_clean_ge_0.85": (clean.get("pixel_auc_positive_diff_raw") or 0) >= 0.85,
        "shortcut_marker_mass_ge_0.8": (shortcut.get("shortcut_marker_mass_rate") or 0) >= 0.8,
        "clean_marker_mass_le_0.1": (clean.get("shortcut_marker_mass_rate") or 0) <= 0.1,
    }


def benchmark_provenance(assets: dict, fingerprint: dict, frame_threshold, frame_normalize: bool) -> dict:
    """Who made cycle.json's numbers: environment, the weights' sha256, and the (non-learned) scorers."""
    from cyclex.explain.evaluate_run import MARKER_MASS_SHARE, MARKER_TOP_PERCENT
    from cyclex.findings import ABNORMALITIES
    from cyclex.provenance import environment, frame_threshold_rule

    return {
        **environment(),
        "weights": fingerprint["weights"],
        "models": {name: {k: str(v) for k, v in paths.items()} for name, paths in assets.items()},
        "scorers": {
            "cycle_verdict": "rule labeler (cyclex.labelers.RuleLabeler) on the regenerated report",
            "pixel_auc": "ground-truth phantom masks (exact by construction), inside the true chest box; no learned scorer",
            "marker": (f"largest frame component overlaps the marker mask; strict: >= {MARKER_MASS_SHARE:g} of the raw "
                       f"map's top-{MARKER_TOP_PERCENT:g} % mass on it"),
            "mass_outside_chest_box": "share of the positive map's mass outside the phantom's true chest box",
            "frame_threshold": frame_threshold_rule(frame_threshold, frame_normalize, findings=ABNORMALITIES),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.work_folder import prepare_work_folder, weights_fingerprint
    from cyclex.datasets.seed_registry import TRAINING, VALIDATION, check_held_out, ranges_of
    from cyclex.demo.run_demo import (
        DEMO_CHECKPOINT,
        DEMO_FRAME_NORMALIZE,
        DEMO_FRAME_THRESHOLD,
        DEMO_GUIDANCE,
        DEMO_STRENGTH,
        demo_assets,
    )
    from cyclex.explain.frames import DEFAULT_BLUR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="held-out phantoms")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (inversion and sampling)")
    parser.add_argument("--guidance", type=float, default=DEMO_GUIDANCE, help="omega (the demo's default)")
    parser.add_argument("--strength", type=float, default=DEMO_STRENGTH, help="denoising strength delta")
    parser.add_argument("--frame-threshold", default=DEMO_FRAME_THRESHOLD,
                        help="L on 0-255, or 'stable' (95 +- 10 chosen per item)")
    parser.add_argument("--frame-normalize", action=argparse.BooleanOptionalAction, default=DEMO_FRAME_NORMALIZE,
                        help="stretch |I - CF| to a maximum of 255 before thresholding")
    parser.add_argument("--map-blur", type=int, default=DEFAULT_BLUR,
                        help="Gaussian kernel smoothing the positive map (cyclex's default 5; 1: raw)")
    parser.add_argument("--checkpoint", default=DEMO_CHECKPOINT, help="best_psnr | final | ... of the tailored SD")
    parser.add_argument("--alternatives", nargs="*", default=list(DEFAULT_ALTERNATIVES),
                        help="VARIANT:REFERENCE[@OMEGA] configurations measured besides the headline")
    parser.add_argument("--skip-demo-timing", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep earlier runs in benchmarks/.work/cycle (refused when weights or cyclex version "
                             "changed); default: start from scratch")
    args = parser.parse_args(argv)

    assets = demo_assets()
    fingerprint = weights_fingerprint(path for paths in assets.values() for path in paths.values())
    prepare_work_folder(WORK, fingerprint, resume=args.resume)
    query_seeds = check_held_out(CYCLE_BENCHMARK_QUERIES.drawn(args.n), "benchmarks/cycle.py queries")
    records, chest_boxes, truth = held_out_queries(args.n, BENCH_SEED, WORK / "phantoms")
    frame_threshold = args.frame_threshold if args.frame_threshold == "stable" else float(args.frame_threshold)
    result: dict = {"n_phantoms": args.n, "query_seeds": query_seeds, "training_seeds": ranges_of(TRAINING),
                    "validation_seeds": ranges_of(VALIDATION), "resumed": args.resume,
                    "provenance": benchmark_provenance(assets, fingerprint, frame_threshold, args.frame_normalize),
                    "steps": args.steps, "guidance": args.guidance, "strength": args.strength,
                    "frame_threshold": frame_threshold, "frame_normalize": args.frame_normalize, "checkpoint": args.checkpoint,
                    "map_blur": args.map_blur, "mask_min_change": truth[1].mask_min_change,
                    "variant": "ddim", "difference_reference": "query",
                    "generators": measure("ddim", "query", records, chest_boxes, args, assets, WORK / "ddim-query",
                                          truth)}
    if not args.skip_demo_timing:
        result["demo_seconds"] = round(time_demo(args.steps), 1)
    result["goals"] = goals_of(result["generators"], result.get("demo_seconds"))
    result["goals_strict"] = strict_goals_of(result["generators"])
    # The same measures for the other makers / difference references (not the headline, which is
    # plain DDIM against the query): where the demo's tiny SD limits the plain maker, what helps.
    result["alternatives"] = {}
    for config in args.alternatives:
        config_name, _, omega = config.partition("@")
        variant, _, reference = config_name.partition(":")
        settings = argparse.Namespace(**{**vars(args), "guidance": float(omega) if omega else args.guidance})
        generators = measure(variant, reference or "query", records, chest_boxes, settings, assets,
                             WORK / config.replace(":", "-").replace("@", "-omega-"), truth)
        result["alternatives"][config] = {"variant": variant, "difference_reference": reference or "query",
                                          "guidance": settings.guidance, "generators": generators,
                                          "goals": goals_of(generators), "goals_strict": strict_goals_of(generators)}
    from cyclex.atomic_io import write_json_atomic

    write_json_atomic(RESULTS, result)
    print(json.dumps({k: v for k, v in result.items() if k != "alternatives"}, indent=2))
    return result


if __name__ == "__main__":
    main()
