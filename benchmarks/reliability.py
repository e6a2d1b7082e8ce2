"""Reliability and security of issue 18: the hostile-input corpus, kill -9 trials and the security cases.

    python -m benchmarks.reliability [--kill9-trials 20] [--only PATTERN]

Writes benchmarks/results/reliability.json: `n_bad_inputs` and the count per outcome (`clear_error`,
`skipped_logged`, `ok` for hostile-looking but valid inputs handled right, and the failures
`unclear`, `hang`, `silent_wrong`, `data_loss`), every case that failed with its detail,
`kill9_trials` / `kill9_mismatches` (explain and train-tailored each), `security_cases` /
`security_failures`, and provenance. No model weights or learned scorers are involved: the corpus
runs on the tiny random demo-size SD and a rule-based generator (benchmarks/hostile_generators.py).
The work folder is benchmarks/.work/reliability, made afresh on every run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.reliability_corpus import CASES, FAILURES, OUTCOMES, SECURITY, Fixtures, run_case
from benchmarks.work_folder import prepare_work_folder
from cyclex.atomic_io import write_json_atomic
from cyclex.provenance import environment

RESULTS = Path(__file__).parent / "results" / "reliability.json"


def run_corpus(cases, work: Path, fixtures: Fixtures, *, progress: bool = True) -> list[dict]:
    rows = []
    for number, case in enumerate(cases):
        started = time.perf_counter()
        row = run_case(case, work / f"case{number:03d}", fixtures)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        if progress:
            mark = "  <-- " + row["detail"][:200] if row["outcome"] in FAILURES else ""
            print(f"{row['outcome']:15s} {case.name}{mark}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill9-trials", type=int, default=20, help="trials per command (explain, train-tailored)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from cyclex import __version__

    work = prepare_work_folder(Path(__file__).parent / ".work" / "reliability",
                               {"cyclex_version": __version__, "weights": {}})
    fixtures = Fixtures(work / "fixtures")
    fixtures.root.mkdir(parents=True)
    started = time.perf_counter()
    from benchmarks.reliability_kill9 import explain_trials, train_trials

    _ = fixtures.tailored  # built once, before the two strands below share it
    kill9: list[dict] = []
    failures: list[BaseException] = []

    def kill9_strand() -> None:  # child processes only, so it runs beside the in-process corpus
        try:
            kill9.extend(explain_trials(args.kill9_trials, work / "kill9-explain", fixtures))
            kill9.extend(train_trials(args.kill9_trials, work / "kill9-train", fixtures))
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            failures.append(error)

    strand = threading.Thread(target=kill9_strand, daemon=True)
    if args.kill9_trials:
        strand.start()
    corpus = run_corpus([c for c in CASES if args.only in c.name], work / "corpus", fixtures)
    security = run_corpus([c for c in SECURITY if args.only in c.name], work / "security", fixtures)
    if args.kill9_trials:
        strand.join()
    if failures:
        raise failures[0]
    counts = Counter(row["outcome"] for row in corpus)
    per_command = {}
    for row in corpus:
        per_command.setdefault(row["command"], Counter())[row["outcome"]] += 1
    result = {
        "n_bad_inputs": len(corpus),
        **{outcome: counts.get(outcome, 0) for outcome in OUTCOMES},
        "outcomes_per_command": {k: dict(v) for k, v in sorted(per_command.items())},
        "failed_cases": [row for row in corpus if row["outcome"] in FAILURES],
        "kill9_trials": len(kill9),
        "kill9_mismatches": sum(t["mismatch"] for t in kill9),
        "kill9_killed": sum(t["killed"] for t in kill9),  # trials whose SIGKILL landed before the run ended
        "kill9_per_command": {c: {"trials": sum(t["command"] == c for t in kill9),
                                  "mismatches": sum(t["mismatch"] and t["command"] == c for t in kill9),
                                  "modes": dict(Counter(t["mode"] for t in kill9 if t["command"] == c))}
                              for c in ("explain", "train-tailored")},
        "kill9": kill9,
        "security_cases": len(security),
        "security_failures": sum(row["outcome"] in FAILURES for row in security),
        "security": security,
        "cases": corpus,
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": {
            **environment(),
            "scorers": "none: outcomes are judged by exit codes, messages, files and hashes (no learned scorer)",
            "models": "the tiny random demo-size Stable Diffusion (cyclex.demo.tiny_sd) and rule-based generators "
                      "(benchmarks/hostile_generators.py); no trained weights",
            "seeds": "none from the seed registry: inputs are hand-made hostile files; kill times from "
                     "random.Random(0) (explain) and random.Random(1) (train-tailored)",
            "command": " ".join(["python -m benchmarks.reliability", *(argv if argv is not None else sys.argv[1:])]),
        },
    }
    write_json_atomic(args.out, result)
    print(f"{len(corpus)} bad inputs: {dict(counts)}; kill -9: {result['kill9_mismatches']}/{len(kill9)} "
          f"mismatches; security: {result['security_failures']}/{len(security)} failures -> {args.out}")
    return 0 if not result["failed_cases"] and not result["kill9_mismatches"] and not result["security_failures"] \
        else 1


if __name__ == "__main__":
    raise SystemExit(main())
