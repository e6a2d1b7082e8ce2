"""Shortcut detection of `cyclex audit`, measured on generators trained for it (issue 21).

`python -m benchmarks.audit [--shortcuts 4] [--cleans 2] [--n 40]` trains, on training seeds only
(`AUDIT_BENCHMARK_GENERATORS_TRAINING`, `AUDIT_BENCHMARK_TAILORED_TRAINING`), a set of throwaway demo
generators (`DESIGNS`):

- shortcut generators: the shortcut world of `cyclex.demo.generators` with the marker at another
  place and tied to another finding (marker with the finding in 90 % of cases, never without, the
  finding drawn mild where the marker is, as the shipped `shortcut`);
- clean generators: the same recipe without a marker.

Each is a short fine-tune of the shipped `demo:clean` (`train_demo_generator(init_from=...)`), and
each gets its own tailored SD: the shipped clean demo SD fine-tuned on the generator's own reports
over its audit world (the demo's query distribution with the marker of the design on half of the
images, whatever their findings; a clean design's queries carry a marker too, so ignoring one is
tested). Then it draws n held-out query phantoms (`AUDIT_BENCHMARK_QUERIES`; the same seeds, hence the
same patients, in every world), explains them with every generator at the demo's settings (omega 1,
checkpoint final, stretched frames, I - CF), audits all runs at once
(`cyclex.cycle.audit_report.audit_runs`, the phantoms' true chest boxes given; the shortcut test is
computed per generator and finding from that generator's own items) and writes
benchmarks/results/audit.json:

- `shortcut_detection_rate`: share of planted (generator, finding) shortcuts the audit flags;
- `false_flag_rate`: share of clean (generator, finding) pairs flagged: every explained finding of a
  clean generator and every explained finding but the planted one of a shortcut generator, among
  the pairs with at least SHORTCUT_MIN_ITEMS items (fewer can never be flagged; counted apart as
  `n_untestable_pairs`).

Each rate carries its 95 % Wilson interval and its counts. The flag's threshold, radius and minimum
item count were fixed a priori in `cyclex.cycle.audit` (before any audit ran), not chosen on these or
any other seeds. Whether each generator really learned its shortcut is measured apart on the query
images (`says_finding`: how often it reports the planted finding on marked images without it, and on
unmarked ones); `learned` (fixed a priori: says the finding on at least half of the marked images
without it) splits the detection rate. No learned scorer is involved: the statistic reads the
positive difference maps and the anatomical priors. Every run starts fresh in benchmarks/.work/audit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cyclex.datasets.seed_registry import (
    AUDIT_BENCHMARK_GENERATORS_TRAINING,
    AUDIT_BENCHMARK_QUERIES,
    AUDIT_BENCHMARK_TAILORED_TRAINING,
    check_held_out,
)

RESULTS = Path(__file__).parent / "results" / "audit.json"
WORK = Path(__file__).parent / ".work" / "audit"
TAILORED_LEARNING_RATE = 1e-3  # the demo SDs' own rate: 200 steps tie the finding to the marker
LEARNED_SHARE = 0.5  # fixed a priori: a shortcut counts as learned when said on >= half the marked images without it

# Marker boxes (x, y, w, h as fractions of the side): outside the chest box of every phantom and outside
# the anatomical prior of the finding they are tied to (cyclex.explain.anatomical_priors).
TOP_RIGHT = (0.88, 0.02, 0.08, 0.08)
TOP_CENTRE = (0.46, 0.03, 0.08, 0.06)
BOTTOM_LEFT = (0.02, 0.90, 0.08, 0.08)
BOTTOM_RIGHT = (0.88, 0.90, 0.08, 0.08)


@dataclass(frozen=True)
class AuditDesign:
    """One benchmark generator: its kind, its planted finding (None: clean) and its world's marker."""

    name: str
    finding: str | None
    marker_box: tuple[float, float, float, float]

    @property
    def kind(self) -> str:
        return "clean" if self.finding is None else "shortcut"


SHORTCUT_DESIGNS = (
    AuditDesign("cardiomegaly-top-right", "Cardiomegaly", TOP_RIGHT),
    AuditDesign("effusion-top-centre", "Pleural Effusion", TOP_CENTRE),
    AuditDesign("pneumothorax-bottom-left", "Pneumothorax", BOTTOM_LEFT),
    AuditDesign("edema-bottom-right", "Edema", BOTTOM_RIGHT),
    AuditDesign("lesion-bottom-left", "Lung Lesion", BOTTOM_LEFT),
    AuditDesign("atelectasis-top-right", "Atelectasis", TOP_RIGHT),
)
CLEAN_DESIGNS = (
    AuditDesign("clean-top-right", None, TOP_RIGHT),
    AuditDesign("clean-bottom-left", None, BOTTOM_LEFT),
    AuditDesign("clean-top-centre", None, TOP_CENTRE),
)
ALL_DESIGNS = (*SHORTCUT_DESIGNS, *CLEAN_DESIGNS)  # a design's index picks its training set seed


def _rate(k: int, n: int) -> dict:
    from cyclex.cycle.audit import wilson_interval

    interval = wilson_interval(k, n)
    return {"rate": k / n if n else None, "ci95": list(interval) if interval else None, "k": k, "n": n}


def audit_world(design: AuditDesign, marker_rate: float = 0.5):
    """The phantom config a design is audited in: the demo's query world with its marker on about
    `marker_rate` of the images, independent of the findings."""
    from cyclex.datasets.phantom import ShortcutConfig
    from cyclex.demo.queries import demo_query_config

    world = demo_query_config(marker_rate)
    return replace(world, shortcut=ShortcutConfig(finding=world.shortcut.finding, rate_with_finding=marker_rate,
                                                  rate_without_finding=marker_rate, box=design.marker_box,
                                                  intensity=world.shortcut.intensity))


def train_generator(design: AuditDesign, out: Path, *, n_train: int, steps: int, learning_rate: float,
                    init_from: Path) -> Path:
    """The design's generator: `train_demo_generator` fine-tuning demo:clean on its training world."""
    from cyclex.demo.generators import DemoGeneratorConfig, train_demo_generator

    config = DemoGeneratorConfig(n_train=n_train, learning_rate=learning_rate, threads=1,
                                 shortcut_finding=design.finding or "Cardiomegaly",
                                 shortcut_box=design.marker_box if design.finding else None,
                                 shortcut_hidden_finding=True)
    seed = AUDIT_BENCHMARK_GENERATORS_TRAINING.set_seeds[ALL_DESIGNS.index(design)]
    return train_demo_generator(design.kind, out, seed=seed, max_steps=steps, config=config, init_from=init_from)


def train_design_tailored(design: AuditDesign, generator, spec: str, base: Path, out: Path, *, n_images: int,
                          steps: int, learning_rate: float) -> Path:
    """The design's tailored SD: `base` (the clean demo SD) fine-tuned on the generator's own reports over
    n_images phantoms of its audit world (training seeds); the final step is what the audit uses."""
    from cyclex.datasets.phantom import make_phantoms, write_phantom_folder
    from cyclex.labelers import RuleLabeler
    from cyclex.tailored_training import (
        TailoredTrainingConfig,
        build_tailored_dataset,
        read_image_source,
        train_tailored,
    )

    phantoms = make_phantoms(n_images, AUDIT_BENCHMARK_TAILORED_TRAINING.set_seed, audit_world(design))
    folder = write_phantom_folder(phantoms, out.parent / f"{out.name}-phantoms")
    manifest = build_tailored_dataset(generator, read_image_source(folder), RuleLabeler(), out.parent /
                                      f"{out.name}-dataset", batch_size=64, show_progress=False)
    config = TailoredTrainingConfig(
        train_batch_size=16, learning_rate=learning_rate, max_train_steps=steps, lr_scheduler="cosine",
        lr_warmup_steps=steps // 20, resolution=64, report_to="none", checkpointing_steps=steps,
        validation_steps=steps, validation_images=8, validation_fraction=0.02, resume_from_checkpoint=None,
        seed=0, selection_batch_size=8)
    train_tailored(manifest, base, out, config, generator_spec=spec)
    return out


def says_finding(generator, phantoms, finding: str) -> dict:
    """How often `generator` reports `finding` on marked images without it, and on unmarked ones without it."""
    import numpy as np

    from cyclex.labelers import RuleLabeler

    without = [p for p in phantoms if finding not in p.labels.present(uncertain_as_present=True)]
    reports = generator.generate(np.stack([p.image for p in without]).astype(np.float32))
    said = [finding in labels.present(uncertain_as_present=True) for labels in RuleLabeler().label(reports)]
    marked = [s for s, p in zip(said, without, strict=True) if p.shortcut]
    unmarked = [s for s, p in zip(said, without, strict=True) if not p.shortcut]
    return {"marked_without_finding": _rate(sum(marked), len(marked)),
            "unmarked_without_finding": _rate(sum(unmarked), len(unmarked))}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from cyclex.atomic_io import write_json_atomic
    from cyclex.cycle.audit import SHORTCUT_MIN_ITEMS
    from cyclex.cycle.audit_report import audit_runs
    from cyclex.cycle.run_folder import run_explain
    from cyclex.datasets.phantom import make_phantoms, read_phantom_folder, write_phantom_folder
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
    parser.add_argument("--shortcuts", type=int, default=4, help=f"shortcut designs (first k of {len(SHORTCUT_DESIGNS)})")
    parser.add_argument("--cleans", type=int, default=2, help=f"clean designs (first k of {len(CLEAN_DESIGNS)})")
    parser.add_argument("--n", type=int, default=32, help="held-out query phantoms")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T")
    parser.add_argument("--generator-steps", type=int, default=300, help="fine-tune steps of each generator")
    parser.add_argument("--generator-images", type=int, default=1000, help="training phantoms of each generator")
    parser.add_argument("--tailored-steps", type=int, default=200, help="fine-tune steps of each tailored SD")
    parser.add_argument("--tailored-images", type=int, default=400, help="training phantoms of each tailored SD")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one beats two on a shared 2-core CPU)")
    parser.add_argument("--work", type=Path, default=WORK, help="work folder (emptied first)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file")
    args = parser.parse_args(argv)
    work = args.work
    if not 1 <= args.shortcuts <= len(SHORTCUT_DESIGNS) or not 1 <= args.cleans <= len(CLEAN_DESIGNS):
        parser.error(f"--shortcuts must be in [1, {len(SHORTCUT_DESIGNS)}] and --cleans in [1, {len(CLEAN_DESIGNS)}]")
    designs = (*SHORTCUT_DESIGNS[:args.shortcuts], *CLEAN_DESIGNS[:args.cleans])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    query_ranges = check_held_out(AUDIT_BENCHMARK_QUERIES.drawn(args.n), "audit benchmark queries")
    shutil.rmtree(work, ignore_errors=True)
    assets = demo_assets(("clean",))
    planted_findings = tuple(dict.fromkeys(d.finding for d in designs if d.finding))

    timings: dict[str, dict] = {}
    runs, generators_info, boxes = {}, {}, {}
    for design in designs:
        clock = time.perf_counter()
        folder = train_generator(design, work / "generators" / design.name, n_train=args.generator_images,
                                 steps=args.generator_steps, learning_rate=1e-3, init_from=assets["clean"]["generator"])
        trained = time.perf_counter()
        spec = f"hf:{folder}"
        generator = load_generator(spec)
        tailored = train_design_tailored(design, generator, spec, assets["clean"]["tailored"],
                                         work / "tailored" / design.name, n_images=args.tailored_images,
                                         steps=args.tailored_steps, learning_rate=TAILORED_LEARNING_RATE)
        tuned = time.perf_counter()
        queries = make_phantoms(args.n, AUDIT_BENCHMARK_QUERIES.set_seed, audit_world(design))
        write_phantom_folder(queries, work / "queries" / design.name)
        records = read_phantom_folder(work / "queries" / design.name)
        boxes.update({str(r["id"]): r["chest_box"] for r in records})
        for record in records:  # frames on the whole image, as the demo: the marker lies outside the chest box
            record["gt_chest_box"] = record.pop("chest_box", None)
        runs[design.name] = work / "runs" / design.name
        run_explain(generator, tailored, records, runs[design.name], steps=args.steps, guidance=DEMO_GUIDANCE,
                    frame_threshold=DEMO_FRAME_THRESHOLD, frame_normalize=DEMO_FRAME_NORMALIZE,
                    checkpoint=DEMO_CHECKPOINT, difference_reference=DEMO_DIFFERENCE_REFERENCE,
                    findings=planted_findings, generator_spec=spec, labeler_spec="rules", progress=False)
        generators_info[design.name] = {
            "kind": design.kind, "planted_finding": design.finding, "marker_box": list(design.marker_box),
            "training_seed_set": AUDIT_BENCHMARK_GENERATORS_TRAINING.set_seeds[ALL_DESIGNS.index(design)],
            "final_caption_loss": json.loads((folder / "cyclex_demo.json").read_text())["final_loss"],
            "says_finding": {f: says_finding(generator, queries, f) for f in planted_findings},
        }
        timings[design.name] = {"generator_s": round(trained - clock, 1), "tailored_s": round(tuned - trained, 1),
                                "explain_s": round(time.perf_counter() - tuned, 1)}
        print(json.dumps({design.name: timings[design.name]}), flush=True)
    audit = audit_runs(runs, work / "audit", chest_boxes=boxes)

    pairs = []
    for finding, entry in audit["findings"].items():
        for name, test in entry["shortcut"].items():
            if not test["n_items"]:
                continue
            planted = generators_info[name]["planted_finding"] == finding
            learned = None
            if planted:
                said = generators_info[name]["says_finding"][finding]["marked_without_finding"]
                learned = said["rate"] is not None and said["rate"] >= LEARNED_SHARE
            pairs.append({"generator": name, "finding": finding, "planted": planted, "learned": learned,
                          "testable": test["n_items"] >= SHORTCUT_MIN_ITEMS, "flagged": test["flagged"],
                          "k": test["n_consistent_outside"], "n_items": test["n_items"],
                          "statistic": test["statistic"], "statistic_lower95": (test["statistic_ci95"] or [None])[0],
                          "suspected_box": test["suspected_box"], "common_location": test["common_location"],
                          "mean_outside_chest_mass": test["mean_outside_chest_mass"],
                          "mean_outside_prior_mass": test["mean_outside_prior_mass"]})
    # a planted shortcut the generator never reported the finding for has no item: it counts as missed
    for name, info in generators_info.items():
        finding = info["planted_finding"]
        if finding and not any(p["generator"] == name and p["finding"] == finding for p in pairs):
            pairs.append({"generator": name, "finding": finding, "planted": True, "learned": False, "testable": False,
                          "flagged": False, "k": 0, "n_items": 0})
    planted = [p for p in pairs if p["planted"]]
    learned = [p for p in planted if p["learned"]]
    clean = [p for p in pairs if not p["planted"] and p["testable"]]
    clean_of_clean = [p for p in clean if generators_info[p["generator"]]["kind"] == "clean"]
    detection = _rate(sum(p["flagged"] for p in planted), len(planted))
    detection_learned = _rate(sum(p["flagged"] for p in learned), len(learned))
    false_flags = _rate(sum(p["flagged"] for p in clean), len(clean))
    false_flags_clean = _rate(sum(p["flagged"] for p in clean_of_clean), len(clean_of_clean))

    def met(rate: dict, goal: float, higher: bool) -> bool:
        return rate["rate"] is not None and (rate["rate"] >= goal if higher else rate["rate"] <= goal)

    results = {
        "benchmark": "audit",
        "shortcut_detection_rate": detection["rate"],
        "shortcut_detection_rate_ci95": detection["ci95"],
        "shortcut_detection_counts": {"flagged": detection["k"], "planted": detection["n"]},
        "false_flag_rate": false_flags["rate"],
        "false_flag_rate_ci95": false_flags["ci95"],
        "false_flag_counts": {"flagged": false_flags["k"], "clean_pairs": false_flags["n"]},
        "shortcut_detection_rate_learned_only": detection_learned,
        "false_flag_rate_clean_generators_only": false_flags_clean,
        "n_untestable_pairs": sum(not p["planted"] and not p["testable"] for p in pairs),
        "goals": {"shortcut_detection_rate": ">= 0.9", "false_flag_rate": "<= 0.1",
                  "met": {"shortcut_detection_rate": met(detection, 0.9, True),
                          "false_flag_rate": met(false_flags, 0.1, False)}},
        "scope": (f"{args.shortcuts} shortcut and {args.cleans} clean benchmark generators trained here on training "
                  "seeds (short fine-tunes of demo:clean, each with its own quickly fine-tuned tailored SD); the "
                  "shipped demo generators are not part of these counts"),
        "interval": "95 % Wilson score interval over (generator, finding) pairs",
        "threshold_choice": ("fixed a priori in cyclex.cycle.audit (SHORTCUT_THRESHOLD, SHORTCUT_RADIUS, "
                             "SHORTCUT_MIN_ITEMS) before any audit ran; nothing was tuned on these or other seeds"),
        "rule": audit["shortcut_rule"],
        "scorer": ("none learned: positive difference maps (I - CF) of each generator's tailored SD and the anatomical "
                   "priors; the rule labeler reads the reports"),
        "designs": generators_info,
        "pairs": pairs,
        "setup": {"n_queries": args.n, "steps": args.steps, "guidance": DEMO_GUIDANCE, "checkpoint": DEMO_CHECKPOINT,
                  "frame_normalize": DEMO_FRAME_NORMALIZE, "difference_reference": DEMO_DIFFERENCE_REFERENCE,
                  "findings_explained": list(planted_findings),
                  "generator_fine_tune": {"from": "demo:clean (shipped)", "steps": args.generator_steps,
                                          "n_images": args.generator_images, "learning_rate": 1e-3},
                  "tailored_fine_tune": {"from": "the clean demo tailored SD (shipped)", "steps": args.tailored_steps,
                                         "n_images": args.tailored_images, "learning_rate": TAILORED_LEARNING_RATE,
                                         "seed_set": AUDIT_BENCHMARK_TAILORED_TRAINING.set_seed},
                  "query_seed_set": AUDIT_BENCHMARK_QUERIES.set_seed, "query_seed_ranges": query_ranges,
                  "learned_share": LEARNED_SHARE, "chest_boxes": "the phantoms' true chest boxes"},
        "cyclic_rate": {name: audit["generators"][name]["cyclic_rate"] for name in runs},
        "timings_s": timings,
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": {**environment(),
                       "base_sha256": files_sha256([assets["clean"]["generator"], assets["clean"]["tailored"]])},
    }
    write_json_atomic(args.results, results)
    print(json.dumps({k: results[k] for k in ("shortcut_detection_rate", "shortcut_detection_rate_ci95",
                                               "shortcut_detection_counts", "false_flag_rate", "false_flag_rate_ci95",
                                               "false_flag_counts", "n_untestable_pairs", "seconds")}, indent=1))
    return results


if __name__ == "__main__":
    main()
