"""Train the demo's phantom classifier (13 findings, 64 px) and cache it.

    python scripts/train_phantom_classifier.py [--out DIR] [--n-train 1600] [--steps 600] [--seed 0]

Default output: $CYCLEX_HOME/demo/classifier (CYCLEX_HOME defaults to ~/.cache/cyclex).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cyclex.datasets.seed_registry import PHANTOM_CLASSIFIER_TRAINING, PHANTOM_CLASSIFIER_VALIDATION
from cyclex.demo.phantom_classifier import phantom_classifier_dir, train_phantom_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: %(default)s -> cache)")
    parser.add_argument("--n-train", type=int, default=PHANTOM_CLASSIFIER_TRAINING.n)
    parser.add_argument("--n-val", type=int, default=PHANTOM_CLASSIFIER_VALIDATION.n)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=PHANTOM_CLASSIFIER_TRAINING.set_seed,
                        help="training set seed (the seed registry's phantom_classifier_training)")
    parser.add_argument("--val-seed", type=int, default=PHANTOM_CLASSIFIER_VALIDATION.set_seed)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or phantom_classifier_dir()
    train_phantom_classifier(out, n_train=args.n_train, n_val=args.n_val, steps=args.steps, seed=args.seed,
                             val_seed=args.val_seed)
    metrics = json.loads((out / "metrics.json").read_text())
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
