"""One process of a distributed explain test: `accelerate launch ... tests/distributed_explain_script.py`.

Builds the fake explainer of cycle_fakes (generator from pixel brightness, keyword labeler, painting
maker) on the queries of `make_queries` and runs `run_explainer_distributed` into --out. Hooks for
the pitfalls under test, from the environment:
  CYCLEX_TEST_DIE=RANK:CALLS   rank RANK exits at once (os._exit, like kill -9) at its CALLS-th generator call
  CYCLEX_TEST_SLOW_RANK=RANK   rank RANK waits 3 s before its shard, so the others finish first
  CYCLEX_TEST_FAIL_BRIGHT=1    the generator raises on any batch holding an image with effusion and edema
  CYCLEX_TEST_RANK_LOG=1       the maker logs every request into the run folder, as the search does
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from cycle_fakes import (  # noqa: E402
    EDEMA,
    EFFUSION,
    KeywordLabeler,
    PaintingMaker,
    brightness_reports,
    query,
    region_mean,
)
from PIL import Image  # noqa: E402

from cyclex.adapters import CallableGenerator, GeneratorInfo  # noqa: E402
from cyclex.cycle import CyclicExplainer  # noqa: E402

# image id -> (heart, effusion, edema); ids with characters a file name cannot hold on purpose
QUERIES = {"a": (0.9, 0.9, 0.1), "b/1": (0.9, 0.1, 0.1), "n": (0.1, 0.1, 0.1), "c d": (0.9, 0.9, 0.9),
           "e": (0.1, 0.9, 0.1), "f": (0.9, 0.1, 0.9), "g": (0.1, 0.1, 0.9), "h": (0.9, 0.9, 0.1)}


def make_queries(folder: Path, ids=None, *, write: bool = True) -> list[dict]:
    """Records of the queries (input order: QUERIES' order, or `ids`' order), their PNGs in `folder`.

    write: write the PNGs (the test does, once, before launching; the processes only read them).
    """
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for number, image_id in enumerate(ids or list(QUERIES)):
        heart, effusion, edema = QUERIES[image_id]
        path = folder / f"q{number}.png"
        if write:
            Image.fromarray(np.uint8(query(heart, effusion, edema)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": image_id, "image": str(path), "chest_box": [0, 0, 32, 32]})
    return records


class RankLoggingMaker(PaintingMaker):
    """PaintingMaker with the search's run log: a line per request, per rank in a distributed run."""

    def start_run(self, run_dir, rank=None):
        from cyclex.counterfactuals.search_maker import ATTEMPTS_NAME, rank_attempts_path, read_attempts

        self.log_path = Path(run_dir) / ATTEMPTS_NAME if rank is None else rank_attempts_path(run_dir, rank)
        self._log = read_attempts(self.log_path)

    def make(self, images, source_prompts, target_prompts, *, masks=None, seed=0):
        from cyclex.atomic_io import write_text_atomic
        from cyclex.counterfactuals.inversion_cache import image_hash

        out = super().make(images, source_prompts, target_prompts, masks=masks, seed=seed)
        for image, source, target in zip(images, source_prompts, target_prompts, strict=True):
            key = f"{image_hash(image)}|{source}|{target}"
            self._log[key] = {"request": key}
        write_text_atomic(self.log_path, "".join(json.dumps(line) + "\n" for line in self._log.values()))
        return out

    def merge_ranks(self, run_dir):
        from cyclex.counterfactuals.search_maker import SearchingMaker

        SearchingMaker.merge_ranks(self, run_dir)  # the search's own fold, on this maker's log

    def finish_run(self, run_dir):
        (Path(run_dir) / "rank_log_finished.json").write_text(json.dumps({"n": len(self._log)}))


def make_explainer(rank: int = 0) -> CyclicExplainer:
    die_rank, _, die_calls = os.environ.get("CYCLEX_TEST_DIE", "").partition(":")
    calls = [0]

    fail_bright = os.environ.get("CYCLEX_TEST_FAIL_BRIGHT") == "1"

    def reports(images):
        calls[0] += 1
        if die_rank and int(die_rank) == rank and calls[0] >= int(die_calls):
            os._exit(9)  # no clean-up at all, as a kill -9
        if fail_bright and bool(((region_mean(images, EFFUSION) > 0.5) & (region_mean(images, EDEMA) > 0.5)).any()):
            raise RuntimeError("the generator fails on images with both effusion and edema")
        return brightness_reports(images)

    generator = CallableGenerator(reports, GeneratorInfo(name="fake:brightness", channels=1))
    maker_class = RankLoggingMaker if os.environ.get("CYCLEX_TEST_RANK_LOG") == "1" else PaintingMaker
    return CyclicExplainer(generator, KeywordLabeler(), maker_class(ineffective={"Edema"}), frame_threshold=95)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--ids", default="", help="comma-separated ids of QUERIES (default: all)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="recorded in the settings (a settings-change test)")
    args = parser.parse_args()

    from cyclex.cycle.distributed import process_state, run_explainer_distributed

    state = process_state()
    records = make_queries(Path(args.inputs), [i for i in args.ids.split(",") if i] or None, write=False)
    if os.environ.get("CYCLEX_TEST_SLOW_RANK", "") == str(state.process_index):
        time.sleep(3)
    summary = run_explainer_distributed(make_explainer(state.process_index), records, args.out,
                                        batch_size=args.batch_size, progress=False, state=state,
                                        run_settings={"test_steps": args.steps})
    if summary is not None:
        print(f"merged {summary['n']} items of {summary['n_images']} images")


if __name__ == "__main__":
    main()
