"""Shortcut detection of `cyclex audit` on held-out phantoms with the two shipped demo generators (issue 21).

`python -m benchmarks.audit [--n 40] [--steps 50]`: draws n held-out query phantoms
(`AUDIT_BENCHMARK_QUERIES`, the demo's query world: the marker on about half of the images, whatever
their findings), explains them with `clean` and `shortcut` at the demo's settings (omega 1, checkpoint
final, stretched frames, I - CF), audits both run folders (`cyclex.cycle.audit_report.audit_runs`,
the phantoms' chest boxes given) and writes benchmarks/results/audit.json:

- `shortcut_detection_rate`: share of planted shortcuts the audit flags. Only one shortcut is planted
  in what ships (shortcut / Cardiomegaly, marker top-left outside the chest), so n = 1 and its Wilson
  interval is wide by construction: this is a check, not a rate;
- `false_flag_rate`: share of clean (generator, finding) pairs flagged: every finding of `clean` and
  every finding of `shortcut` but Cardiomegaly, among the pairs with at least SHORTCUT_MIN_ITEMS
  items (fewer can never be flagged; they are counted apart as `n_untestable_pairs`).

The shortcut test's threshold and radius were fixed a priori (`cyclex.cycle.audit`), not tuned on these
seeds. No learned scorer is involved: the statistic is computed on the positive difference maps and
the anatomical priors. Training further shortcut generators (markers elsewhere, other findings) is
issue 21's full benchmark and is not done here. Every run starts fresh in benchmarks/.work/audit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from cyclex.datasets.seed_registry import AUDIT_BENCHMARK_QUERIES, check_held_out

RESULTS = Path(__file__).parent / "results" / "audit.json"
WORK = Path(__file__).parent / ".work" / "audit"
PLANTED = {("shortcut", "Cardiomegaly")}  # the demo's one planted shortcut


def _rate(k: int, n: int) -> dict:
    from cyclex.cycle.audit import wilson_interval

    interval = wilson_interval(k, n)
    return {"rate": k / n if n else None, "ci95": list(interval) if interval else None, "k": k, "n": n}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from cyclex.atomic_io import write_json_atomic
    from cyclex.cycle.audit import SHORTCUT_MIN_ITEMS
    from cyclex.cycle.audit_report import audit_runs
    from cyclex.cycle.run_folder import run_explain
    from cyclex.demo.queries import demo_query_phantoms
    from cyclex.demo.run_demo import (
        DEMO_CHECKPOINT,
        DEMO_DIFFERENCE_REFERENCE,
        DEMO_FRAME_NORMALIZE,
        DEMO_FRAME_THRESHOLD,
        DEMO_GUIDANCE,
        demo_assets,
    )
    from cyclex.provenance import environment, files_sha256
    from cyclex.specs.generators import load_generator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="held-out query phantoms")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one beats two on a shared 2-core CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    query_ranges = check_held_out(AUDIT_BENCHMARK_QUERIES.drawn(args.n), "audit benchmark queries")
    shutil.rmtree(WORK, ignore_errors=True)
    from cyclex.datasets.phantom import read_phantom_folder, write_phantom_folder

    write_phantom_folder(demo_query_phantoms(args.n, seed=AUDIT_BENCHMARK_QUERIES.set_seed), WORK / "phantoms")
    records = read_phantom_folder(WORK / "phantoms")
    boxes = {str(r["id"]): r["chest_box"] for r in records}
    for record in records:  # frames on the whole image, as the demo: the marker lies outside the chest box
        record["gt_chest_box"] = record.pop("chest_box", None)
    assets = demo_assets(("clean", "shortcut"))
    runs = {}
    for name in ("clean", "shortcut"):
        runs[name] = WORK / name
        run_explain(load_generator(f"demo:{name}"), assets[name]["tailored"], records, runs[name], steps=args.steps,
                    guidance=DEMO_GUIDANCE, frame_threshold=DEMO_FRAME_THRESHOLD, frame_normalize=DEMO_FRAME_NORMALIZE,
                    checkpoint=DEMO_CHECKPOINT, difference_reference=DEMO_DIFFERENCE_REFERENCE,
                    generator_spec=f"demo:{name}", labeler_spec="rules", progress=False)
    audit = audit_runs(runs, WORK / "audit", chest_boxes=boxes)

    pairs = []
    for finding, entry in audit["findings"].items():
        for name, test in entry["shortcut"].items():
            if test["n_items"]:
                pairs.append({"generator": name, "finding": finding, "planted": (name, finding) in PLANTED,
                              "testable": test["n_items"] >= SHORTCUT_MIN_ITEMS, "flagged": test["flagged"],
                              "k": test["n_consistent_outside"], "n_items": test["n_items"],
                              "statistic": test["statistic"], "statistic_lower95": (test["statistic_ci95"] or [None])[0],
                              "suspected_box": test["suspected_box"],
                              "mean_outside_chest_mass": test["mean_outside_chest_mass"],
                              "mean_outside_prior_mass": test["mean_outside_prior_mass"]})
    planted = [p for p in pairs if p["planted"]]
    clean = [p for p in pairs if not p["planted"] and p["testable"]]
    detection = _rate(sum(p["flagged"] for p in planted), len(planted))
    false_flags = _rate(sum(p["flagged"] for p in clean), len(clean))
    results = {
        "benchmark": "audit",
        "shortcut_detection_rate": detection["rate"],
        "shortcut_detection_rate_ci95": detection["ci95"],
        "shortcut_detection_counts": {"flagged": detection["k"], "planted": detection["n"]},
        "false_flag_rate": false_flags["rate"],
        "false_flag_rate_ci95": false_flags["ci95"],
        "false_flag_counts": {"flagged": false_flags["k"], "clean_pairs": false_flags["n"]},
        "n_untestable_pairs": sum(not p["planted"] and not p["testable"] for p in pairs),
        "goals": {"shortcut_detection_rate": ">= 0.9", "false_flag_rate": "<= 0.1",
                  "met": {"shortcut_detection_rate": detection["rate"] is not None and detection["rate"] >= 0.9,
                          "false_flag_rate": false_flags["rate"] is not None and false_flags["rate"] <= 0.1}},
        "scope": ("the two shipped demo generators only: one planted shortcut (shortcut / Cardiomegaly), so the "
                  "detection rate rests on n = 1 and its interval is wide; no further shortcut generators were trained"),
        "interval": "95 % Wilson score interval over (generator, finding) pairs",
        "rule": audit["shortcut_rule"],
        "scorer": "none learned: positive difference maps (I - CF) of the demo tailored SDs and the anatomical priors",
        "pairs": pairs,
        "setup": {"n_queries": args.n, "steps": args.steps, "guidance": DEMO_GUIDANCE, "checkpoint": DEMO_CHECKPOINT,
                  "frame_normalize": DEMO_FRAME_NORMALIZE, "difference_reference": DEMO_DIFFERENCE_REFERENCE,
                  "query_seed_set": AUDIT_BENCHMARK_QUERIES.set_seed, "query_seed_ranges": query_ranges,
                  "chest_boxes": "the phantoms' true chest boxes"},
        "cyclic_rate": {name: audit["generators"][name]["cyclic_rate"] for name in runs},
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": {**environment(), "tailored_sd_sha256": files_sha256([assets[n]["tailored"] for n in runs])},
    }
    write_json_atomic(RESULTS, results)
    print(json.dumps({k: results[k] for k in ("shortcut_detection_rate", "shortcut_detection_rate_ci95",
                                               "shortcut_detection_counts", "false_flag_rate", "false_flag_rate_ci95",
                                               "false_flag_counts", "n_untestable_pairs", "seconds")}, indent=1))
    return results


if __name__ == "__main__":
    main()
