"""Region-specific editing against plain DDIM on held-out phantoms (issue 19's benchmark).

`python -m benchmarks.rse [--n 100] [--n-validation 50] [--steps 50] [--generator clean]`:
1. on validation phantoms (`RSE_VALIDATION`) sweep RSE's tau (0.1 .. 0.5) with the pixel paste on
   (an earlier sweep on these validation phantoms found paste lowering outside energy at every tau;
   the paper's no-paste default is still reported), and choose the setting with the lowest outside
   energy among those whose Cyclic Rate is within 0.02 of plain DDIM's there (t_rel = 0.5 as DiffEdit,
   4 relevance draws, the anatomical prior: not swept); the same rule chooses instruct + RSE's tau
   against the instruction editor's own validation Cyclic Rate;
2. on held-out query phantoms (`RSE_BENCHMARK_QUERIES`) explain with the demo generator and its
   tailored SD at the demo's settings (omega, checkpoint, frame normalisation): plain DDIM, RSE at the
   chosen setting (`rse`, the headline), RSE at the paper's tau = 0.1 without paste
   (`rse_paper_default`), the demo instruction editor (`instruct`: InstructPix2Pix three-way guidance
   at the paper's s_T = 7.5, s_I = 1.5, "Remove the {finding}") and the editor with RSE masking
   (`instruct_rse`), and write benchmarks/results/rse.json. Per maker, on the same items:
- `cyclic_rate` with a bootstrap 95 % interval (over items), `cyclic_rate_without_collateral`;
- `outside_energy`: share of |I - CF| mass outside the finding's true mask (mean over items with a mask);
- `pixel_auc`: pixel ROC-AUC of the saved positive map against the true mask (whole image);
- `true_cf_l1` / `true_cf_ssim`: the counterfactual against the world's true counterfactual, the same
  phantom redrawn without the finding (`cyclex.datasets.phantom.without_finding`);
- masked makers only: `guidance_map_pixel_auc` (the guidance map G = M * R against the true mask) and
  the edit mask's mean area;
- `population`: per maker, its set of counterfactuals against the set of true counterfactuals of the
  same items: KL of the mean predicted finding probabilities and FID in the phantom classifier's
  features (both stand-ins: the demo's phantom classifier in place of a CheXpert classifier and of
  Inception / torchxrayvision features); CMIG is not computed (the phantom world has no retention
  attributes such as race or age).
Every other figure is a pixel metric against the phantom world's truth: no learned scorer is involved.
The instruction editor was trained on exact phantom pairs of `DEMO_INSTRUCT_TRAINING` (seed registry).
Every run starts fresh in benchmarks/.work/rse.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from cyclex.datasets.seed_registry import (
    ANATOMICAL_PRIOR_FITTING,
    DEMO_INSTRUCT_TRAINING,
    RSE_BENCHMARK_QUERIES,
    RSE_VALIDATION,
    TAILORED_SD_TRAINING,
    check_held_out,
)

RESULTS = Path(__file__).parent / "results" / "rse.json"
WORK = Path(__file__).parent / ".work" / "rse"
MAKERS = ("ddim", "rse", "instruct", "instruct_rse")
INSTRUCT_IMAGE_GUIDANCE = 1.5  # s_I (InstructPix2Pix)
# the editor's grid on validation phantoms: (s_T, denoising strength); s_T 7.5 and strength 1 are the paper's
INSTRUCT_GRID = ((7.5, 1.0), (1.5, 1.0), (7.5, 0.6), (1.5, 0.6))


def bootstrap_ci(values, n_resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap 95 % interval of the mean of `values` (None for no values)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def _mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image) > 127


def item_measures(run: Path, phantoms: dict, config, images: dict | None = None) -> list[dict]:
    """One dict per result line: verdicts and, where the phantom has the finding, the pixel measures.
    images: when given, collects (counterfactual, true counterfactual) arrays per item for `population`."""
    from skimage.metrics import structural_similarity

    from cyclex.datasets.phantom import without_finding
    from cyclex.explain.alignment import pixel_roc_auc

    items = []
    for line in (json.loads(x) for x in (run / "results.jsonl").read_text().splitlines() if x.strip()):
        item = {"image_id": line["image_id"], "finding": line["finding"], "verified": bool(line["verified"]),
                "collateral": bool(line["collateral_added"] or line["collateral_lost"])}
        phantom = phantoms[line["image_id"]]
        if line["finding"] in phantom.findings_meta and line.get("mask_png"):
            mask = _mask(run / line["mask_png"])
            signed = np.load(run / line["signed_npy"])  # I - CF, float
            query = phantom.image.astype(np.float32)
            counterfactual = np.clip(query - signed, 0, 1)
            true_cf = without_finding(phantom, line["finding"], config).image.astype(np.float32)
            energy = np.abs(signed)
            if images is not None:
                images[(line["image_id"], line["finding"])] = (counterfactual, true_cf)
            item.update({
                "outside_energy": float(energy[~mask].sum() / max(energy.sum(), 1e-12)),
                "pixel_auc": pixel_roc_auc(np.load(run / line["positive_npy"]), mask),
                "true_cf_l1": float(np.abs(counterfactual - true_cf).mean()),
                "true_cf_ssim": float(structural_similarity(counterfactual, true_cf, data_range=1.0)),
            })
            if "guidance_map_npy" in line["files"]:
                guidance = np.squeeze(np.load(run / line["files"]["guidance_map_npy"]))
                item["guidance_map_pixel_auc"] = pixel_roc_auc(guidance, mask)
                item["edit_area"] = float(np.load(run / line["files"]["edit_mask_npy"]).mean())
        items.append(item)
    return items


def summarise(items: list[dict]) -> dict:
    verified = [float(i["verified"]) for i in items]
    clean_removal = [float(i["verified"] and not i["collateral"]) for i in items]
    out = {"n_items": len(items), "cyclic_rate": float(np.mean(verified)) if items else None,
           "cyclic_rate_ci95": bootstrap_ci(verified),
           "cyclic_rate_without_collateral": float(np.mean(clean_removal)) if items else None,
           "cyclic_rate_without_collateral_ci95": bootstrap_ci(clean_removal)}
    for key in ("outside_energy", "pixel_auc", "true_cf_l1", "true_cf_ssim", "guidance_map_pixel_auc", "edit_area"):
        values = [i[key] for i in items if key in i and np.isfinite(i[key])]
        if values:
            out[key] = float(np.mean(values))
            out[f"{key}_ci95"] = bootstrap_ci(values)
            out[f"{key}_n"] = len(values)
    return out


def paired_difference(a: list[dict], b: list[dict], key: str) -> dict | None:
    """Mean of b - a over the items both have `key` for (same image and finding), with its interval."""
    first = {(i["image_id"], i["finding"]): i[key] for i in a if key in i}
    pairs = [(first[(i["image_id"], i["finding"])], i[key]) for i in b
             if key in i and (i["image_id"], i["finding"]) in first]
    if not pairs:
        return None
    diffs = [float(y) - float(x) for x, y in pairs]
    return {"mean": float(np.mean(diffs)), "ci95": bootstrap_ci(diffs), "n": len(diffs)}


# the sweep on validation phantoms: (tau, paste) candidates; the paper's (0.1, no paste) is always reported too
TAUS = (0.1, 0.2, 0.3, 0.5)
PASTES = (True,)
INSTRUCT_TAUS = (0.1, 0.3, 0.5)
PAPER_DEFAULT = {"tau": 0.1, "paste_query_outside_mask": False}


def population_measures(sets: dict[str, dict], classifier) -> dict:
    """Per maker: KL(P_true || Q_maker) of mean predicted probabilities and FID, on the items every maker
    has (stand-in scorer: the phantom classifier's sigmoid outputs and penultimate features)."""
    import torch

    from cyclex.explain.population import EncoderFeatures, frechet_distance, mean_probability_kl

    common = sorted(set.intersection(*(set(v) for v in sets.values()))) if sets else []
    if len(common) < 2:
        return {"status": f"too few common items ({len(common)})"}
    truth = torch.from_numpy(np.stack([next(iter(sets.values()))[k][1] for k in common]))[:, None]
    features = EncoderFeatures(classifier, classifier.num_features)
    p_true = torch.sigmoid(classifier(truth)).numpy()
    out = {"n_items": len(common), "scorer": "stand-in: demo phantom classifier (cyclex.demo.phantom_classifier) "
           "probabilities (KL) and penultimate features (FID), in place of a CheXpert classifier and Inception features",
           "cmig": None, "cmig_status": "not computed: the phantom world has no retention attributes (race, age)",
           "makers": {}}
    for name, items in sets.items():
        generated = torch.from_numpy(np.stack([items[k][0] for k in common]))[:, None]
        q = torch.sigmoid(classifier(generated)).numpy()
        out["makers"][name] = {"kl_true_vs_maker": mean_probability_kl(p_true, q),
                               "fid_vs_true_cf": frechet_distance(truth, generated, features)}
    return out


def choose_instruct_setting(grid: list[dict]) -> dict:
    """The editor's (s_T, strength): among the settings within 0.02 of the best Cyclic Rate, the one closest
    to the true counterfactuals (L1; the validation phantoms' truth)."""
    best = max((g["cyclic_rate"] or 0) for g in grid)
    eligible = [g for g in grid if (g["cyclic_rate"] or 0) >= best - 0.02 and g.get("true_cf_l1") is not None]
    chosen = min(eligible or grid, key=lambda g: g.get("true_cf_l1") or 1.0)
    return {"guidance": chosen["guidance"], "strength": chosen["strength"]}


def choose_setting(sweep: list[dict], ddim_rate: float) -> dict:
    """Lowest outside energy among the settings whose Cyclic Rate is within 0.02 of the reference's
    (plain DDIM's for RSE, the editor's own for instruct + RSE; smaller tau first)."""
    eligible = [s for s in sweep if (s["cyclic_rate"] or 0) >= ddim_rate - 0.02 and s.get("outside_energy") is not None]
    if not eligible:
        return dict(PAPER_DEFAULT)
    best = min(eligible, key=lambda s: (round(s["outside_energy"], 4), s["tau"]))
    return {"tau": best["tau"], "paste_query_outside_mask": best["paste_query_outside_mask"]}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.cycle import held_out_queries
    from cyclex.cycle.run_folder import run_explain
    from cyclex.demo.instruct_model import DEMO_INSTRUCT_DIR
    from cyclex.demo.phantom_classifier import load_phantom_classifier
    from cyclex.demo.run_demo import (
        DEMO_CHECKPOINT,
        DEMO_FRAME_NORMALIZE,
        DEMO_GUIDANCE,
        DEMO_STRENGTH,
        demo_assets,
    )
    from cyclex.provenance import environment, files_sha256
    from cyclex.specs.generators import load_generator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="held-out query phantoms")
    parser.add_argument("--n-validation", type=int, default=50, help="validation phantoms of the tau / paste sweep")
    parser.add_argument("--n-validation-instruct", type=int, default=25,
                        help="the first N of them choose the editor's s_T / strength and instruct + RSE's tau")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T of every maker")
    parser.add_argument("--generator", default="clean", choices=("clean", "shortcut"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one beats two on a shared 2-core CPU)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    query_ranges = check_held_out(RSE_BENCHMARK_QUERIES.drawn(args.n), "RSE benchmark queries")
    validation_ranges = RSE_VALIDATION.drawn(args.n_validation)
    if WORK.exists():
        shutil.rmtree(WORK)  # fresh by default: nothing of an earlier run is reused
    WORK.mkdir(parents=True)
    assets = demo_assets((args.generator,))[args.generator]
    generator = load_generator(f"demo:{args.generator}")
    common = {"steps": args.steps, "guidance": DEMO_GUIDANCE, "strength": DEMO_STRENGTH, "checkpoint": DEMO_CHECKPOINT,
              "frame_normalize": DEMO_FRAME_NORMALIZE}

    instruct = {"instruct_model": str(DEMO_INSTRUCT_DIR), "image_guidance_scale": INSTRUCT_IMAGE_GUIDANCE}

    def run(records, phantoms, config, folder: Path, variant: str, maker_kwargs=None,
            images: dict | None = None, **changes) -> tuple[dict, list[dict]]:
        start = time.perf_counter()
        overrides = {**common, **changes}
        run_explain(generator, assets["tailored"], records, folder, variant=variant, maker_kwargs=maker_kwargs,
                    generator_spec=f"demo:{args.generator}", labeler_spec="rules", progress=False, **overrides)
        items = item_measures(folder, phantoms, config, images)
        return {**summarise(items), "seconds": round(time.perf_counter() - start, 1)}, items

    # 1. Choose tau and the pixel paste on validation phantoms (never on the reported ones)
    records, _, (phantoms, config) = held_out_queries(args.n_validation, RSE_VALIDATION.set_seed, WORK / "validation")
    ddim_validation, _ = run(records, phantoms, config, WORK / "validation_ddim", "ddim")
    sweep = []
    for tau in TAUS:
        for paste in PASTES:
            setting = {"tau": tau, "paste_query_outside_mask": paste}
            summary, _ = run(records, phantoms, config, WORK / f"validation_rse_{tau}_{paste}", "rse", setting)
            sweep.append({**setting, **{k: summary.get(k) for k in ("cyclic_rate", "outside_energy", "edit_area",
                                                                     "guidance_map_pixel_auc", "true_cf_l1")}})
    chosen = choose_setting(sweep, ddim_validation["cyclic_rate"] or 0)
    # the editor's (s_T, strength) and instruct + RSE's tau, on the first n_validation_instruct of them
    records = records[: args.n_validation_instruct]
    instruct_grid = []
    for guidance, strength in INSTRUCT_GRID:
        summary, _ = run(records, phantoms, config, WORK / f"validation_instruct_{guidance}_{strength}", "instruct",
                         instruct, guidance=guidance, strength=strength)
        instruct_grid.append({"guidance": guidance, "strength": strength,
                              **{k: summary.get(k) for k in ("cyclic_rate", "outside_energy", "true_cf_l1")}})
    instruct_chosen_grid = choose_instruct_setting(instruct_grid)
    instruct_run = {"guidance": instruct_chosen_grid["guidance"], "strength": instruct_chosen_grid["strength"]}
    instruct_validation = next(g for g in instruct_grid if g["guidance"] == instruct_run["guidance"]
                               and g["strength"] == instruct_run["strength"])
    instruct_sweep = []
    for tau in INSTRUCT_TAUS:
        setting = {"tau": tau, "paste_query_outside_mask": True}
        summary, _ = run(records, phantoms, config, WORK / f"validation_instruct_rse_{tau}", "instruct-rse",
                         {**instruct, **setting}, **instruct_run)
        instruct_sweep.append({**setting, **{k: summary.get(k) for k in ("cyclic_rate", "outside_energy", "edit_area",
                                                                          "guidance_map_pixel_auc", "true_cf_l1")}})
    instruct_chosen = choose_setting(instruct_sweep, instruct_validation["cyclic_rate"] or 0)

    # 2. Report on held-out phantoms: plain DDIM, RSE at the chosen setting, RSE at the paper's setting
    records, _, (phantoms, config) = held_out_queries(args.n, RSE_BENCHMARK_QUERIES.set_seed, WORK / "phantoms")
    results: dict = {
        "benchmark": "rse", "generator": f"demo:{args.generator}", "n_phantoms": args.n, "steps": args.steps,
        "settings": {**common, "rse": {"relevance_strength": 0.5, "relevance_draws": 4, "prior": "anatomy", **chosen},
                     "rse_paper_default": {"relevance_strength": 0.5, "relevance_draws": 4, "prior": "anatomy",
                                           **PAPER_DEFAULT},
                     "instruct": {"guidance_scale_s_T": instruct_run["guidance"], "strength": instruct_run["strength"],
                                  "image_guidance_scale_s_I": INSTRUCT_IMAGE_GUIDANCE,
                                  "instruct_model": "demo (cyclex/demo/weights/instruct)",
                                  "instruction": "Remove the {finding}"},
                     "instruct_rse": {"relevance_strength": 0.5, "relevance_draws": 4, "prior": "anatomy",
                                      "guidance_scale_s_T": instruct_run["guidance"], "strength": instruct_run["strength"],
                                      "image_guidance_scale_s_I": INSTRUCT_IMAGE_GUIDANCE, **instruct_chosen}},
        "validation": {"n_phantoms": args.n_validation, "seeds": validation_ranges,
                       "rule": "lowest outside_energy among (tau, paste) with Cyclic Rate >= DDIM's - 0.02",
                       "ddim": {k: ddim_validation.get(k) for k in ("cyclic_rate", "outside_energy")},
                       "sweep": sweep, "chosen": chosen,
                       "instruct_n_phantoms": args.n_validation_instruct,
                       "instruct_rule": "s_T / strength: lowest true_cf_l1 among settings within 0.02 of the best "
                                        "Cyclic Rate; instruct + RSE tau: the RSE rule against the chosen editor",
                       "instruct_grid": instruct_grid, "instruct_chosen": instruct_run,
                       "instruct": {k: instruct_validation.get(k) for k in ("cyclic_rate", "outside_energy")},
                       "instruct_rse_sweep": instruct_sweep, "instruct_rse_chosen": instruct_chosen},
        "query_seeds": query_ranges,
        "training_seeds": {"tailored_sd": TAILORED_SD_TRAINING.ranges, "anatomical_priors": ANATOMICAL_PRIOR_FITTING.ranges,
                           "instruct_editor": DEMO_INSTRUCT_TRAINING.ranges},
        "scorer": "none for the per-maker figures: pixel metrics against the phantom world's true masks and true "
                  "counterfactuals; `population` uses a stand-in (see there)",
        "provenance": {**environment(), "tailored_sd_sha256": files_sha256([assets["tailored"]]),
                       "instruct_editor_sha256": files_sha256([DEMO_INSTRUCT_DIR]),
                       "instruct_editor_training": json.loads((DEMO_INSTRUCT_DIR / "cyclex_instruct.json").read_text())},
        "makers": {},
    }
    per_maker, image_sets = {}, {}
    arms = {"ddim": ("ddim", None), "rse": ("rse", chosen), "rse_paper_default": ("rse", PAPER_DEFAULT),
            "instruct": ("instruct", instruct), "instruct_rse": ("instruct-rse", {**instruct, **instruct_chosen})}
    for name, (variant, maker_kwargs) in arms.items():
        image_sets[name] = {}
        changes = instruct_run if variant.startswith("instruct") else {}
        results["makers"][name], per_maker[name] = run(records, phantoms, config, WORK / name, variant, maker_kwargs,
                                                       image_sets[name], **changes)
    results["population"] = population_measures(image_sets, load_phantom_classifier(train_if_missing=False))
    for other in ("rse", "instruct", "instruct_rse"):
        results[f"paired_{other}_minus_ddim"] = {key: paired_difference(per_maker["ddim"], per_maker[other], key)
                                                 for key in ("verified", "outside_energy", "pixel_auc", "true_cf_l1")}
    ddim, rse = results["makers"]["ddim"], results["makers"]["rse"]
    results["goals"] = {
        "rse_outside_energy_le_fifth_of_ddim": rse.get("outside_energy", 1) <= ddim.get("outside_energy", 0) / 5,
        "rse_cyclic_rate_not_lower": (rse["cyclic_rate"] or 0) >= (ddim["cyclic_rate"] or 0) - 0.02,
        "rse_guidance_map_pixel_auc_ge_0.85": rse.get("guidance_map_pixel_auc", 0) >= 0.85,
        "rse_closer_to_true_cf_l1": rse.get("true_cf_l1", 1) < ddim.get("true_cf_l1", 0),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"chosen": chosen, **{k: results["makers"][k] for k in arms}}, indent=1))
    print(json.dumps(results["goals"], indent=1))
    return results


if __name__ == "__main__":
    main()
