"""Build the demo's instruction editor and ship it in cyclex/demo/weights/instruct (float16, < 3 MB).

    python scripts/build_demo_instruct.py [--n 1500] [--steps 3000] [--batch-size 16] [--out DIR]

1. exact training pairs from the seed registry's `demo_instruct_training` phantoms (the demo's query
   world: the shortcut marker on half of them): each phantom with and without each of its findings,
   "Remove the {finding}" (`phantom_instruction_pairs`);
2. the 8-channel UNet widened from the clean demo generator's tailored SD (checkpoint `final`, the
   demo's) and trained with `train_instruct` in a work folder (resumable: rerun the same command);
3. the pipeline folder copied into the package with floating tensors as float16 and the training
   record (`cyclex_instruct.json`) beside it.
On 2 shared CPU cores the default takes about 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from cyclex.datasets.seed_registry import DEMO_INSTRUCT_TRAINING

WORK = Path(__file__).resolve().parents[1] / "benchmarks" / ".work" / "demo_instruct"


def ship(folder: Path, out: Path) -> list[Path]:
    """Copy the inference parts of a pipeline folder to `out`, safetensors cast to float16."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    written = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.parts[0] in ("checkpoints", "logs") or path.name in ("instruct_run.json",):
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
            save_file(tensors, str(target), metadata=metadata)
        else:
            shutil.copyfile(path, target)
        written.append(target)
    return written


def main() -> None:
    from cyclex.demo.instruct_model import DEMO_INSTRUCT_DIR
    from cyclex.demo.queries import demo_query_config
    from cyclex.demo.run_demo import DEMO_CHECKPOINT, demo_assets
    from cyclex.tailored_training.instruct_training import (
        InstructTrainingConfig,
        phantom_instruction_pairs,
        train_instruct,
    )
    from cyclex.tailored_training.output import resolve_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=DEMO_INSTRUCT_TRAINING.n, help="training phantoms")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=WORK, help="training folder (resumable)")
    parser.add_argument("--out", type=Path, default=DEMO_INSTRUCT_DIR, help="where the shipped copy goes")
    parser.add_argument("--overwrite", action="store_true", help="start the training folder over")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    DEMO_INSTRUCT_TRAINING.drawn(args.n)  # refuses an n past the registered training range
    tailored = demo_assets(("clean",))["clean"]["tailored"]
    base_unet = resolve_checkpoint(tailored, DEMO_CHECKPOINT)
    pairs = phantom_instruction_pairs(args.n, DEMO_INSTRUCT_TRAINING.set_seed, demo_query_config())
    logging.info("%d exact pairs from %d phantoms", len(pairs), args.n)
    config = InstructTrainingConfig(train_batch_size=args.batch_size, max_train_steps=args.steps,
                                    learning_rate=args.learning_rate, lr_warmup_steps=min(100, args.steps // 10),
                                    checkpointing_steps=500, checkpoints_total_limit=1)
    description = (f"{args.n} phantoms of set {DEMO_INSTRUCT_TRAINING.set_seed} (seed registry "
                   f"{DEMO_INSTRUCT_TRAINING.name}), demo query world, remove pairs; base: demo tailored SD clean, "
                   f"checkpoint {DEMO_CHECKPOINT}")
    result = train_instruct(pairs, tailored, args.work, config, base_unet=base_unet, data_description=description,
                            overwrite=args.overwrite)
    written = ship(args.work, args.out)
    sizes = {str(p.relative_to(args.out)): p.stat().st_size for p in written}
    too_big = {k: v for k, v in sizes.items() if v >= 3 * 2**20}
    if too_big:
        raise SystemExit(f"shipped files must stay under 3 MB each: {too_big}")
    print(json.dumps({"steps": result.global_step, "last_loss": result.last_loss, "pairs": len(pairs),
                      "images_per_s": result.images_per_s, "files": sizes}, indent=1))


if __name__ == "__main__":
    main()
