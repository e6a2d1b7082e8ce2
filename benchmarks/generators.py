"""Benchmark of the two demo generators on held-out phantoms -> benchmarks/results/generators.json.

* clean: per-finding F1 on 500 held-out phantoms (the rule labeler reads the generated report; the
  truth is the phantom's own labels; present = positive or uncertain). Goal: macro F1 >= 0.85 over
  the findings it was trained on.
* shortcut: the rate at which it reports Cardiomegaly on 500 normal phantoms carrying the spurious
  marker (goal >= 0.8) and on the same 500 phantoms without it (goal <= 0.1).

Run: `python -m benchmarks.generators [--n 500] [--seed 777]` (trains the generators first when
they are not cached under $CYCLEX_HOME).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from cyclex.atomic_io import write_json_atomic
from cyclex.datasets.phantom import PhantomConfig, ShortcutConfig, make_phantom, make_phantoms, phantom_seed
from cyclex.datasets.seed_registry import GENERATORS_BENCHMARK_QUERIES, check_held_out
from cyclex.demo.generators import METADATA_FILE, demo_generator_path
from cyclex.findings import ABNORMALITIES
from cyclex.labelers import RuleLabeler
from cyclex.specs.generators import load_generator

logger = logging.getLogger("benchmarks.generators")
RESULTS = Path(__file__).parent / "results" / "generators.json"
GOALS = {"clean_macro_f1": (">=", 0.85), "shortcut_marker_cardiomegaly_rate": (">=", 0.8),
         "shortcut_nomarker_cardiomegaly_rate": ("<=", 0.1)}
# held out (cyclex.datasets.seed_registry): phantoms of set 777 (seeds 777e6 + i) and, for the shortcut
# generator's true cardiomegaly, set 778
HELD_OUT_SEED = GENERATORS_BENCHMARK_QUERIES.set_seeds[0]


def _as_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).astype(np.float32))[:, None]


def _present(labels, finding: str) -> bool:
    return finding in labels.present(uncertain_as_present=True)


def _folder_info(path: Path) -> dict:
    files = [p for p in path.rglob("*") if p.is_file()]
    metadata = json.loads((path / METADATA_FILE).read_text())
    return {"folder_bytes": sum(p.stat().st_size for p in files), "train_seconds": metadata.get("train_seconds"),
            "data_seconds": metadata.get("data_seconds"), "steps": metadata.get("steps"),
            "process_cpu_seconds": metadata.get("process_cpu_seconds"),
            "torch_threads": metadata.get("torch_threads"), "n_parameters": metadata.get("n_parameters"),
            "n_train": metadata["config"]["n_train"], "epochs": metadata["config"]["epochs"]}


def evaluate_clean(n: int, seed: int, labeler: RuleLabeler) -> dict:
    generator = load_generator("demo:clean")
    config = PhantomConfig(report_style="canonical")
    phantoms = make_phantoms(n, seed, config)
    reports = generator.generate(_as_batch([p.image for p in phantoms]))
    predicted = labeler.label(reports)
    trained_on = [f for f in ABNORMALITIES if config.prevalence.get(f, 0.0) > 0]
    per_finding, precision, recall, support = {}, {}, {}, {}
    for finding in trained_on:
        truth = [_present(p.labels, finding) for p in phantoms]
        guess = [_present(labels, finding) for labels in predicted]
        per_finding[finding] = float(f1_score(truth, guess, zero_division=0.0))
        precision[finding] = float(precision_score(truth, guess, zero_division=0.0))
        recall[finding] = float(recall_score(truth, guess, zero_division=0.0))
        support[finding] = int(sum(truth))
    exact = float(np.mean([r.strip() == p.report.strip() for r, p in zip(reports, phantoms, strict=True)]))
    return {"clean_macro_f1": float(np.mean(list(per_finding.values()))), "clean_f1_per_finding": per_finding,
            "clean_precision_per_finding": precision, "clean_recall_per_finding": recall,
            "clean_support_per_finding": support, "clean_exact_report_rate": exact,
            "clean_examples": [{"truth": p.report, "generated": r} for p, r in zip(phantoms[:5], reports[:5], strict=True)]}


def evaluate_shortcut(n: int, seed: int, labeler: RuleLabeler) -> dict:
    generator = load_generator("demo:shortcut")
    config = PhantomConfig(report_style="canonical", shortcut=ShortcutConfig(finding="Cardiomegaly"))
    rates = {}
    for marker in (True, False):
        images = [make_phantom(phantom_seed(seed, i), config, findings={}, shortcut=marker).image for i in range(n)]
        labels = labeler.label(generator.generate(_as_batch(images)))
        rates[marker] = float(np.mean([_present(item, "Cardiomegaly") for item in labels]))
    # and how it does on real cardiomegaly without the marker (it learned the marker instead)
    cardio = [make_phantom(phantom_seed(seed + 1, i), config, findings={"Cardiomegaly": {}}, shortcut=False).image
              for i in range(n)]
    cardio_rate = float(np.mean([_present(item, "Cardiomegaly")
                                 for item in labeler.label(generator.generate(_as_batch(cardio)))]))
    return {"shortcut_marker_cardiomegaly_rate": rates[True], "shortcut_nomarker_cardiomegaly_rate": rates[False],
            "shortcut_cardiomegaly_without_marker_recall": cardio_rate}



def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="held-out phantoms per evaluation")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see DemoGeneratorConfig.threads)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folders = {name: demo_generator_path(name) for name in ("clean", "shortcut")}
    labeler = RuleLabeler()
    query_seeds = check_held_out([[phantom_seed(s, 0), phantom_seed(s, args.n)] for s in (args.seed, args.seed + 1)],
                                 "benchmarks/generators.py queries")
    results: dict = {"n_phantoms": args.n, "held_out_seed": args.seed, "query_seeds": query_seeds}
    results.update(evaluate_clean(args.n, args.seed, labeler))
    results.update(evaluate_shortcut(args.n, args.seed, labeler))
    results["generators"] = {name: _folder_info(path) for name, path in folders.items()}
    results["goals"] = {key: {"goal": f"{op} {value}", "met": bool(results[key] >= value if op == ">=" else
                                                                   results[key] <= value)}
                        for key, (op, value) in GOALS.items()}
    results["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(args.out, results)
    logger.info("wrote %s: clean macro F1 %.3f, shortcut marker %.3f / no marker %.3f", args.out,
                results["clean_macro_f1"], results["shortcut_marker_cardiomegaly_rate"],
                results["shortcut_nomarker_cardiomegaly_rate"])
    return results


if __name__ == "__main__":
    main()
