"""Run every benchmark in turn: `python -m benchmarks [NAME ...]` (what `make bench` calls).

Each benchmark is a module `benchmarks/NAME.py` with a `main()` that writes
`benchmarks/results/NAME.json`, starting from scratch (no run of an earlier call is reused; the
scripts that keep work folders take `--resume`). They run one after another in separate processes
so one failure does not hide the others' results; the exit code is non-zero when any failed.
"""

from __future__ import annotations

import subprocess
import sys
import time

ORDER = ("generators", "tailored", "demo_guidance", "cycle", "search", "search_gpu", "throughput", "labeler", "rse", "causal", "scale", "reliability")
# The arguments the committed results were made with (a 2-core CPU; see each module's docstring).
ARGS = {
    "search": ["--findings", "200", "--steps", "4", "--threads", "1"],  # held-out, same grid (its defaults)
    "reliability": ["--kill9-trials", "20"],  # 20 trials each for explain and train-tailored
}
# Runs before a benchmark, in the same fresh state: search's rules and chosen arm come from validation seeds.
BEFORE = {"search": ["--fit-validation", "--findings", "80", "--steps", "4", "--threads", "1"]}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str]) -> int:
    names = argv or list(ORDER)
    failed = []
    for name in names:
        if name == "search_gpu" and not _has_cuda():
            print("== benchmark search_gpu: skipped, no GPU on this machine (its figures go to gpu.json)",
                  flush=True)
            continue
        start = time.perf_counter()
        print(f"== benchmark {name}", flush=True)
        code = 0
        if name in BEFORE:
            code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *BEFORE[name]])
        if not code:
            code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *ARGS.get(name, [])])
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
