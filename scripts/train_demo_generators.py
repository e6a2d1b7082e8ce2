"""Regenerate the two demo report generators (`clean`, `shortcut`) on phantoms.

    python scripts/train_demo_generators.py [--out DIR] [--names clean shortcut] [--threads 1]

Without --out they go to the cache `$CYCLEX_HOME/demo/generators/NAME` (default ~/.cache/cyclex),
where `load_generator("demo:clean")` finds them. Same seed, same library versions and thread
count -> the same weights (CPU training is deterministic up to floating-point reduction order).

Other shortcut worlds (what benchmarks/audit.py trains, one generator at a time, never into the cache):

    python scripts/train_demo_generators.py --names shortcut --out benchmarks/.work/gens --folder-name effusion-tc \
        --shortcut-finding "Pleural Effusion" --shortcut-box 0.46,0.03,0.08,0.06 --hidden-finding \
        --init-from ~/.cache/cyclex/demo/generators/clean --max-steps 300 --n-train 1200 --learning-rate 1e-3 \
        --seed 7711

--seed must then be a training set seed of the seed registry (`audit_benchmark_generators_training`:
7710-7718); the shipped generators' defaults are unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from cyclex.datasets.seed_registry import AUDIT_BENCHMARK_GENERATORS_TRAINING, DEMO_GENERATORS_TRAINING
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
    # other shortcut worlds (benchmarks/audit.py); the defaults are the shipped generators'
    parser.add_argument("--shortcut-finding", default=DemoGeneratorConfig.shortcut_finding,
                        help="the finding the marker accompanies (shortcut world)")
    parser.add_argument("--shortcut-box", default=None, help="marker box x,y,w,h as fractions (default: top-left)")
    parser.add_argument("--hidden-finding", action="store_true",
                        help="marked images report the finding without drawing it (DemoGeneratorConfig)")
    parser.add_argument("--init-from", type=Path, default=None, help="a saved demo generator to fine-tune")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: epochs)")
    parser.add_argument("--learning-rate", type=float, default=DemoGeneratorConfig.learning_rate)
    parser.add_argument("--folder-name", default=None, help="folder under --out (default: the name; one name only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.out is None and (args.folder_name or args.init_from or args.shortcut_box or args.hidden_finding):
        parser.error("other worlds never go into the cache: give --out")
    if args.folder_name and len(args.names) != 1:
        parser.error("--folder-name names one generator: give one --names")
    training_seeds = (*DEMO_GENERATORS_TRAINING.set_seeds, *AUDIT_BENCHMARK_GENERATORS_TRAINING.set_seeds)
    if args.seed not in training_seeds:  # generators learn from registered training data only
        parser.error(f"--seed {args.seed} is not a registered training set seed {training_seeds} "
                     "(cyclex.datasets.seed_registry)")
    box = None
    if args.shortcut_box:
        try:
            box = tuple(float(v) for v in args.shortcut_box.split(","))
        except ValueError:
            parser.error(f"--shortcut-box {args.shortcut_box!r} must be four numbers x,y,w,h")
    config = replace(DemoGeneratorConfig(), threads=args.threads, learning_rate=args.learning_rate,
                     shortcut_finding=args.shortcut_finding, shortcut_box=box,
                     shortcut_hidden_finding=args.hidden_finding)
    parent = args.out or cyclex_home() / "demo" / "generators"
    for name in args.names:
        started = time.perf_counter()
        folder = train_demo_generator(name, parent / (args.folder_name or name), n_train=args.n_train,
                                      epochs=args.epochs, seed=args.seed, max_steps=args.max_steps, config=config,
                                      init_from=args.init_from)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        metadata = json.loads((folder / METADATA_FILE).read_text())
        logging.info("%s: %s, %.1f MB, %d steps, %.0f s training (%.0f s total)", name, folder, size / 1e6,
                     metadata["steps"], metadata["train_seconds"], time.perf_counter() - started)


if __name__ == "__main__":
    main()
