"""Regenerate the two demo report generators (`clean`, `shortcut`) on phantoms.

    python scripts/train_demo_generators.py [--out DIR] [--names clean shortcut] [--threads 1]

Without --out they go to the cache `$CYCLEX_HOME/demo/generators/NAME` (default ~/.cache/cyclex),
where `load_generator("demo:clean")` finds them. Same seed, same library versions and thread
count -> the same weights (CPU training is deterministic up to floating-point reduction order).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from cyclex.datasets.seed_registry import DEMO_GENERATORS_TRAINING
from cyclex.demo.generators import (
    DEMO_GENERATOR_NAMES,
    METADATA_FILE,
    DemoGeneratorConfig,
    cyclex_home,
    train_demo_generator,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="parent folder (default: the cyclex cache)")
    parser.add_argument("--names", nargs="+", default=list(DEMO_GENERATOR_NAMES), choices=DEMO_GENERATOR_NAMES)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=DEMO_GENERATORS_TRAINING.set_seed,
                        help="phantom set seed (the seed registry's demo_generators_training)")
    parser.add_argument("--threads", type=int, default=DemoGeneratorConfig.threads,
                        help="torch CPU threads (1 is faster on a machine shared with other jobs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parent = args.out or cyclex_home() / "demo" / "generators"
    for name in args.names:
        started = time.perf_counter()
        folder = train_demo_generator(name, parent / name, n_train=args.n_train, epochs=args.epochs,
                                      seed=args.seed, config=replace(DemoGeneratorConfig(), threads=args.threads))
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        metadata = json.loads((folder / METADATA_FILE).read_text())
        logging.info("%s: %s, %.1f MB, %d steps, %.0f s training (%.0f s total)", name, folder, size / 1e6,
                     metadata["steps"], metadata["train_seconds"], time.perf_counter() - started)


if __name__ == "__main__":
    main()
