"""`cyclex explain` on several processes (GPUs, nodes) under `accelerate launch`: one run folder, one lock.

    accelerate launch --num_processes 4 -m cyclex explain --generator ... --out RUN
    cyclex explain --num-processes 4 ...            (the same: it runs `accelerate launch` for you)

How the work is split and put back together (STYLE.md point 21):

- Sharding: image `i` belongs to process `shard_of(id, N)`, a stable hash of its id (sha256, not
  Python's salted `hash`), never its position. Every process computes its shard from the full record
  list, so the processes agree on who does what even while the others are finishing images, and no
  image is given to two of them. accelerate's `split_between_processes` splits by position: its
  shards move when the list of images left changes between processes, and `apply_padding=True`
  repeats the last item to even them out (a duplicate that would be explained twice). Fewer images
  than processes, or an uneven split, just gives some processes little or nothing to do.
- Every (image, finding) item is written by the process that made it, atomically, to its own files
  (`RUN/items/IMAGE/FINDING/`, `RUN/records/IMAGE/FINDING.json`, run_folder.py's layout). A resumed
  run, with any process count, skips what a record file says is finished: nothing done is redone.
- Rank 0 alone takes the run lock (`RUN/.cyclex-run.lock`), checks or writes the settings
  (`run_config.json`, `explain_settings.json`) and tells the other ranks whether the run may go (a
  broadcast); they never touch the lock, so they do not refuse a folder their own rank 0 holds.
- Each rank lists its failed images in `RUN/shards/skipped.rank-R.jsonl` and, when done, writes
  `RUN/shards/done.rank-R.json` (with the run's token, so an earlier run's files do not count).
  Rank 0 waits for every rank's file (no collective with a timeout: shards may take very different
  times), then merges: `results.jsonl` from the record files in input order, findings in vocabulary
  order (the order a single process writes), `skipped.jsonl` from the rank lists, `summary.json`.
  The merge reads only files, so it is resumable: a run killed before or during it is merged by the
  next run (which finds nothing left to do). A rank that fails ends the launch (accelerate stops the
  others); the items already written stay, and the next run does the rest.

The per-batch work is `run_folder.explain_batch`, the function the single-process loop calls, so
one process and N processes make the same result lines (timings aside).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cyclex.atomic_io import write_json_atomic
from cyclex.cycle.explainer import CyclicExplainer
from cyclex.cycle.generator_faults import SkippedItems, guarded_generator
from cyclex.cycle.run_folder import (
    SUMMARY_NAME,
    RunFolderError,
    _progress,
    _write_results,
    check_records,
    explain_batch,
    locked_run_folder,
    prepare_run,
    queries_left,
    result_settings,
    run_config,
    run_explainer,
    start_run_folder,
    write_batch,
)
from cyclex.cycle.settings import ExplainSettings

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"  # RUN/shards: per-rank lists of failed images and done markers, merged by rank 0
_POLL_S = 0.5  # how often rank 0 looks for the other ranks' done markers


def shard_of(image_id: str, num_shards: int) -> int:
    """The shard (process index) of an image: sha256 of its id modulo `num_shards`; stable across runs."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return int.from_bytes(hashlib.sha256(str(image_id).encode("utf-8", "surrogatepass")).digest()[:8], "big") % num_shards


def shard_records(records: Sequence[Mapping[str, Any]], index: int, num_shards: int) -> list[Mapping[str, Any]]:
    """The records of shard `index` of `num_shards`, in input order (possibly none)."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index must be in [0, {num_shards}), got {index}")
    return [r for r in records if shard_of(str(r["id"]), num_shards) == index]


def rank_skipped_path(out: Path, rank: int) -> Path:
    """RUN/shards/skipped.rank-R.jsonl: the failed images of rank R (absent when none failed)."""
    return Path(out) / SHARDS_DIR / f"skipped.rank-{rank}.jsonl"


def rank_scope_path(out: Path, rank: int) -> Path:
    """RUN/shards/scope.rank-R.json: the ids of rank R's images (its skipped list is the word on those)."""
    return Path(out) / SHARDS_DIR / f"scope.rank-{rank}.json"


def rank_done_path(out: Path, rank: int) -> Path:
    """RUN/shards/done.rank-R.json: rank R finished its shard (with the run's token and its counts)."""
    return Path(out) / SHARDS_DIR / f"done.rank-{rank}.json"


def merge_rank_skipped(out: Path) -> SkippedItems:
    """Fold the ranks' lists of failed images into `RUN/skipped.jsonl` and delete them.

    Each rank starts from the main list's lines of its own images (its scope) and writes what is
    still failed, so for those images its list is the word (a line it cleared is gone); lines of
    images in no scope stay as they are.
    """
    out = Path(out)
    main = SkippedItems(out)
    folder = out / SHARDS_DIR
    if not folder.is_dir():
        return main
    ranks = sorted({int(p.name.split("-")[-1].split(".")[0]) for pattern in ("scope.rank-*.json",
                                                                           "skipped.rank-*.jsonl")
                    for p in folder.glob(pattern)})
    for rank in ranks:
        scope, listed = rank_scope_path(out, rank), rank_skipped_path(out, rank)
        if scope.is_file():
            for image_id in json.loads(scope.read_text()):
                main.lines.pop(str(image_id), None)
        if listed.is_file():
            main.lines.update(_read_skipped_lines(listed))
    main.write()
    for rank in ranks:
        rank_skipped_path(out, rank).unlink(missing_ok=True)
        rank_scope_path(out, rank).unlink(missing_ok=True)
    return main


def _read_skipped_lines(path: Path) -> dict[str, dict[str, Any]]:
    lines = {}
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            lines[str(line["id"])] = line
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s line %d is not a skipped-item line; dropped", path, number)
    return lines


def process_state(**kwargs):
    """accelerate's `PartialState` (started once per process; under `accelerate launch` it joins the group).

    Without CUDA it is made with cpu=True, the only way accelerate forms a gloo (MULTI_CPU) group of
    launched processes; otherwise each would believe it is alone and explain every image.
    """
    import torch
    from accelerate import PartialState

    kwargs.setdefault("cpu", not torch.cuda.is_available())
    state = PartialState(**kwargs)
    launched = world_size_of_this_launch()
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(f"this process belongs to a launch of {launched} processes (WORLD_SIZE) but accelerate "
                           f"sees {state.num_processes} ({state.distributed_type}); refusing to explain every image "
                           "in every process")
    return state


def _broadcast_from_main(state, value: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    box = [value if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _wait_for_ranks(out: Path, token: str, num_processes: int) -> list[dict[str, Any]]:
    """Rank 0: wait until every rank wrote its done marker of this run; their contents in rank order."""
    waiting_since = time.monotonic()
    reported = 0.0
    while True:
        done = {}
        for rank in range(num_processes):
            path = rank_done_path(out, rank)
            if path.is_file():
                try:
                    entry = json.loads(path.read_text())
                except json.JSONDecodeError:
                    continue  # cannot happen with atomic writes; looked at again next round
                if entry.get("token") == token:
                    done[rank] = entry
        if len(done) == num_processes:
            return [done[rank] for rank in range(num_processes)]
        if time.monotonic() - waiting_since - reported > 60:
            reported = time.monotonic() - waiting_since
            logger.info("%s: waiting for ranks %s to finish", out,
                        ", ".join(str(r) for r in range(num_processes) if r not in done))
        time.sleep(_POLL_S)


def merge_run(out: str | Path, records: Sequence[Mapping[str, Any]], config: Mapping[str, Any], *,
              seconds: float = 0.0, processes: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Rank 0's merge: skipped.jsonl from the rank lists, results.jsonl and summary.json from the records.

    Reads and writes only files (atomically), so calling it again after a kill gives the same files.
    """
    out = Path(out)
    merge_rank_skipped(out)
    summary = _write_results(out, records, config, seconds)
    if processes:
        summary["processes"] = {"engine": "accelerate", "num_processes": len(processes),
                                "per_process": [dict(p) for p in processes]}
        write_json_atomic(out / SUMMARY_NAME, summary)
    return summary


def run_explainer_distributed(
    explainer: CyclicExplainer,
    records: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    findings: Sequence[str] | None = None,
    batch_size: int = 8,
    image_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    run_settings: Mapping[str, Any] | None = None,
    explain_settings: ExplainSettings | None = None,
    generator_timeout_s: float | None = None,
    state=None,
) -> dict[str, Any] | None:
    """`run_explainer` on this process's shard of `records`; rank 0 merges. Returns the summary on rank 0.

    Call it on every process of an `accelerate launch` (state: accelerate's `PartialState`, made if
    None). With one process it is `run_explainer`. Other ranks return None once their shard is written.
    """
    state = state if state is not None else process_state()
    if state.num_processes == 1:
        return run_explainer(explainer, records, out, findings=findings, batch_size=batch_size,
                             image_size=image_size, overwrite=overwrite, progress=progress,
                             run_settings=run_settings, explain_settings=explain_settings,
                             generator_timeout_s=generator_timeout_s)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    rank, world = state.process_index, state.num_processes
    check_records(records)
    config = run_config(explainer, records, findings=findings, batch_size=batch_size, image_size=image_size,
                        run_settings=run_settings)
    settings = result_settings(config)
    with ExitStack() as held:
        # 1. Rank 0 takes the lock and makes the folder this run's; the others learn whether it may go
        verdict: dict[str, Any] | None = None
        if state.is_main_process:
            try:
                held.enter_context(locked_run_folder(out))
                start_run_folder(out, config, overwrite=overwrite, explain_settings=explain_settings)
                merge_rank_skipped(out)  # what a killed distributed run's ranks listed
                for stale in (out / SHARDS_DIR).glob("done.rank-*.json") if (out / SHARDS_DIR).is_dir() else []:
                    stale.unlink()
                verdict = {"ok": True, "token": uuid.uuid4().hex}
            except (RunFolderError, OSError, ValueError) as error:
                verdict = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                _broadcast_from_main(state, verdict)
                raise
        verdict = _broadcast_from_main(state, verdict)
        if not verdict["ok"]:
            raise RunFolderError(f"rank 0 refused the run folder {out}: {verdict['error']}")
        # 2. This rank's shard: explained in batches by the one per-batch function, one file per item
        start = time.perf_counter()
        mine = shard_records(records, rank, world)
        skipped = SkippedItems(out)
        skipped.lines = {k: v for k, v in skipped.lines.items() if k in {str(r["id"]) for r in mine}}
        skipped.path = rank_skipped_path(out, rank)
        write_json_atomic(rank_scope_path(out, rank), [str(r["id"]) for r in mine])
        todo = queries_left(out, mine, skipped)
        skipped.write()
        explainer.maker.start_run(out, rank=rank)  # a maker's run log: one file per rank, folded by rank 0
        logger.info("%s: rank %d of %d: %d of its %d images left to explain", out, rank, world, len(todo), len(mine))
        n_items = 0
        with guarded_generator(explainer, generator_timeout_s), _progress(progress and state.is_main_process) as bar:
            task = bar.add_task("explain", total=len(mine), completed=len(mine) - len(todo))
            for start_index in range(0, len(todo), batch_size):
                chunk = todo[start_index:start_index + batch_size]
                n_items += write_batch(out, explain_batch(explainer, chunk, findings=findings, image_size=image_size),
                                       settings, skipped)
                skipped.write()
                bar.advance(task, len(chunk))
        seconds = time.perf_counter() - start
        write_json_atomic(rank_done_path(out, rank), {
            "token": verdict["token"], "rank": rank, "num_processes": world, "n_images": len(mine),
            "n_images_explained": len(todo), "n_items_written": n_items, "seconds": round(seconds, 3)})
        if not state.is_main_process:
            return None
        # 3. Rank 0: every rank done, then the merge in the fixed order
        processes = _wait_for_ranks(out, verdict["token"], world)
        explainer.maker.merge_ranks(out)
        explainer.maker.finish_run(out)
        summary = merge_run(out, records, config, seconds=time.perf_counter() - start, processes=processes)
        for rank_index in range(world):
            rank_done_path(out, rank_index).unlink(missing_ok=True)
        return summary


def run_explain_distributed(
    generator,
    tailored_dir: str | Path,
    records,
    out: str | Path,
    settings: ExplainSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    generator_timeout_s: float | None = None,
    state=None,
    **prepare_kwargs: Any,
) -> dict[str, Any] | None:
    """`run_explain` on every process of an `accelerate launch`; the summary on rank 0, None elsewhere.

    prepare_kwargs: those of `run_folder.prepare_run` (labeler_spec=, generator_spec=, ...). With
    `settings.device` "cuda", each process gets its own GPU: `PartialState` made it the current one.
    """
    state = state if state is not None else process_state()
    prepared = prepare_run(generator, tailored_dir, records, settings, **prepare_kwargs)
    return run_explainer_distributed(prepared.explainer, prepared.records, out, overwrite=overwrite,
                                     progress=progress, generator_timeout_s=generator_timeout_s, state=state,
                                     **prepared.run_kwargs())


# -- launching ----------------------------------------------------------------------------------------
def world_size_of_this_launch() -> int:
    """How many processes the launch this process belongs to has (WORLD_SIZE, set by accelerate / torchrun)."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def free_port() -> int:
    """A free TCP port on this host for the rendezvous of a one-node launch."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch_command(cli_args: Sequence[str], num_processes: int, *,
                              main_process_port: int | None = None) -> list[str]:
    """`accelerate launch` of `python -m cyclex CLI_ARGS` on `num_processes` processes of this machine.

    `--multi_gpu` starts torch.distributed processes: NCCL on the GPUs, or a gloo group on the CPU
    where no CUDA device is visible (`--cpu` alone would start one process). Mixed precision and
    dynamo are set so a user's `accelerate config` cannot change the results.
    """
    import sys

    if num_processes < 2:
        raise ValueError(f"num_processes must be >= 2 to launch several processes, got {num_processes}")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(main_process_port if main_process_port is not None else free_port()),
            "-m", "cyclex", *cli_args]
