"""`accelerate launch -m cyclex.tailored_training --manifest M --base B --out O [--max-steps N ...]`.

Every `TailoredTrainingConfig` field is an option (`--train-batch-size 8`, `--use-ema true`, ...).
Training runs on every process; checkpoint selection runs afterwards on the main process only.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from cyclex.tailored_training.config import TailoredTrainingConfig


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cyclex.tailored_training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="manifest.jsonl from build_tailored_dataset (or its folder)")
    parser.add_argument("--base", required=True, help="base Stable Diffusion: a local diffusers folder or a hub id")
    parser.add_argument("--out", required=True, help="output folder (the tailored SD)")
    parser.add_argument("--generator-spec", default=None, help="generator spec recorded in cyclex_tailored.json")
    parser.add_argument("--config", default=None, help="a training_config.json to start from")
    parser.add_argument("--no-select", action="store_true", help="skip checkpoint selection after training")
    parser.add_argument("--overwrite", action="store_true", help="delete a tailored run of another generator, base "
                        "or settings in --out first (without it such a folder is refused)")
    parser.add_argument("--max-steps", dest="max_train_steps", type=int, default=None, help="alias of --max-train-steps")
    defaults = TailoredTrainingConfig()
    for f in dataclasses.fields(TailoredTrainingConfig):
        value = getattr(defaults, f.name)
        kind = {bool: _parse_bool, int: int, float: float}.get(type(value), str)
        if value is None:
            kind = _optional(int if f.name in ("checkpoints_total_limit", "lr_warmup_steps") else str)
        elif f.name in ("checkpoints_total_limit", "resume_from_checkpoint"):
            kind = _optional(kind)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"default: {value}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = TailoredTrainingConfig.load(args.config) if args.config else TailoredTrainingConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TailoredTrainingConfig)
                 if getattr(args, f.name) is not None}
    config = dataclasses.replace(config, **overrides)

    from accelerate import PartialState

    from cyclex.tailored_training.selection import select_checkpoints
    from cyclex.tailored_training.train import train_tailored

    result = train_tailored(args.manifest, args.base, args.out, config, generator_spec=args.generator_spec,
                            overwrite=args.overwrite)
    state = PartialState()
    if state.is_main_process:
        logging.getLogger(__name__).info("trained %d steps, %.1f images/s -> %s", result.global_step,
                                         result.images_per_s, result.output_dir)
        if not args.no_select:
            select_checkpoints(args.out)


if __name__ == "__main__":
    main()
