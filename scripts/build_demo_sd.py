"""Build the embedded default image models: the demo base SD, then the tailored SD of each demo generator.

    python scripts/build_demo_sd.py [--only base|clean|shortcut] [--force]

Output: $CYCLEX_HOME/demo/base_sd and $CYCLEX_HOME/demo/tailored/{clean,shortcut}
(CYCLEX_HOME defaults to ~/.cache/cyclex). On 2 CPU cores the base SD takes about 5 minutes, then
the two tailored SDs about 17 minutes each (run them side by side: one thread each).
"""

from __future__ import annotations

import argparse
import json
import logging

from cyclex.demo.base_sd import (
    BASE_METADATA,
    DEMO_BUILD_FILE,
    DemoBaseSDConfig,
    build_demo_base_sd,
    build_demo_tailored,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("base", "clean", "shortcut"), default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--vae-seconds", type=float, default=None,
                        help="wall-time budget of the VAE loop (default: DemoBaseSDConfig.time_budget_s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.only in (None, "base"):
        config = DemoBaseSDConfig()
        if args.vae_seconds is not None:
            config.time_budget_s = args.vae_seconds
        base = build_demo_base_sd(config=config, force=args.force)
        logging.info("base SD: %s", json.loads((base / BASE_METADATA).read_text()))
    for name in ("clean", "shortcut"):
        if args.only in (None, name):
            folder = build_demo_tailored(name, force=args.force)
            logging.info("tailored SD %s: %s", name, json.loads((folder / DEMO_BUILD_FILE).read_text()))


if __name__ == "__main__":
    main()
