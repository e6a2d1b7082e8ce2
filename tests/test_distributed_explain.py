"""Distributed explain (cycle/distributed.py): 2 and 3 CPU processes under `accelerate launch` (gloo)
make the run folder one process makes, whatever the split, the order ranks finish in, or a rank killed
mid-run and resumed with another process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_explain_script import QUERIES, make_explainer, make_queries

from cyclex.cycle import run_folder as rf
from cyclex.cycle.distributed import (
    SHARDS_DIR,
    accelerate_launch_command,
    merge_rank_skipped,
    rank_scope_path,
    rank_skipped_path,
    shard_of,
    shard_records,
)
from cyclex.cycle.generator_faults import SkippedItems
from cyclex.cycle.run_ownership import RUN_FILE_PATTERNS

SCRIPT = Path(__file__).resolve().parent / "distributed_explain_script.py"


def _launch(num_processes: int, out: Path, inputs: Path, ids: str = "", env: dict | None = None,
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = accelerate_launch_command([], num_processes)
    command = command[:command.index("-m", command.index("--main_process_port"))]  # our script, not cyclex
    command += [str(SCRIPT), "--out", str(out), "--inputs", str(inputs), "--ids", ids, *extra]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                   "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def _reference(tmp_path: Path, ids: str = "") -> list[dict]:
    """results.jsonl of the one-process run (the default path, in this process)."""
    records = make_queries(tmp_path / "in", [i for i in ids.split(",") if i] or None)
    out = tmp_path / "single"
    rf.run_explainer(make_explainer(), records, out, batch_size=2, progress=False, run_settings={"test_steps": 0})
    return _lines(out)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _without_timings(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "timings"} for line in lines]


def _record_times(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}


# -- sharding (no processes needed) ---------------------------------------------------------------------
def test_shards_are_a_stable_partition_by_image_id_not_position():
    ids = [f"image-{n}" for n in range(50)]
    records = [{"id": i} for i in ids]
    for num_shards in (1, 2, 3, 7, 64):
        shards = [shard_records(records, rank, num_shards) for rank in range(num_shards)]
        owned = [r["id"] for shard in shards for r in shard]
        assert sorted(owned) == sorted(ids)  # every image exactly once: no padding duplicate, none lost
        for shard in shards:  # each shard keeps the input order
            assert [r["id"] for r in shard] == [i for i in ids if i in {r["id"] for r in shard}]
    # the owner of an image depends on its id alone: not on what else is in the list or where it stands
    assert [shard_of(i, 3) for i in ids] == [shard_of(i, 3) for i in reversed(ids)][::-1]
    assert shard_records(list(reversed(records)), 1, 3) == list(reversed(shard_records(records, 1, 3)))
    # sha256, fixed across Python processes (Python's own str hash is salted per process)
    assert shard_of("a", 2) == 0 and shard_of("b/1", 2) == 1 and shard_of("c d", 3) == 0
    # more processes than images: most shards are empty
    assert sum(bool(shard_records(records[:2], rank, 64)) for rank in range(64)) <= 2
    with pytest.raises(ValueError, match="num_shards must be >= 1"):
        shard_of("a", 0)


def test_shard_files_belong_to_the_run_folder():
    for name in ("shards/skipped.rank-0.jsonl", "shards/scope.rank-12.json", "shards/done.rank-3.json"):
        assert any(p.fullmatch(name) for p in RUN_FILE_PATTERNS), name


def test_merging_rank_lists_of_failed_images_is_resumable(tmp_path):
    out = tmp_path / "run"
    (out / SHARDS_DIR).mkdir(parents=True)
    # before the run: x failed at the generator, z was unreadable
    main = SkippedItems(out)
    main.add({"id": "x", "image": "x.png"}, "generator", RuntimeError("boom"))
    main.add({"id": "z", "image": "z.png"}, "image", ValueError("unreadable"))
    main.write()
    # rank 0 owned x and y: x now succeeded, y failed; rank 1 owned z and listed nothing (file absent)
    rank_scope_path(out, 0).write_text(json.dumps(["x", "y"]))
    rank_skipped_path(out, 0).write_text(json.dumps({"id": "y", "image": "y.png", "stage": "generator",
                                                     "error_type": "RuntimeError", "error": "y broke"}) + "\n")
    rank_scope_path(out, 1).write_text(json.dumps(["z"]))
    merged = merge_rank_skipped(out)
    assert sorted(merged.lines) == ["y"]
    assert [json.loads(line)["id"] for line in (out / "skipped.jsonl").read_text().splitlines()] == ["y"]
    assert list((out / SHARDS_DIR).iterdir()) == []
    # merging again (a run killed after the merge, resumed) changes nothing
    assert sorted(merge_rank_skipped(out).lines) == ["y"]


# -- two and three processes ------------------------------------------------------------------------------
def test_two_processes_make_the_one_process_results_in_input_order(tmp_path):
    reference = _reference(tmp_path)
    out = tmp_path / "two"
    # rank 0 starts 3 s late: rank 1's items are all written first, the merge order must not follow that
    done = _launch(2, out, tmp_path / "in", env={"CYCLEX_TEST_SLOW_RANK": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merged" in done.stdout
    lines = _lines(out)
    assert _without_timings(lines) == _without_timings(reference)
    assert [(x["image_id"], x["finding"]) for x in lines] == [(x["image_id"], x["finding"]) for x in reference]
    assert len({(x["image_id"], x["finding"]) for x in lines}) == len(lines)  # no item twice
    summary = json.loads((out / "summary.json").read_text())
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    for key in ("cyclic_rate", "n", "n_verified", "per_finding", "n_images", "n_images_done", "settings"):
        assert summary[key] == single[key], key
    per_process = summary["processes"]["per_process"]
    assert [p["rank"] for p in per_process] == [0, 1]  # in rank order, whichever finished first
    assert sum(p["n_images"] for p in per_process) == len(QUERIES)
    # one run folder: one settings file, one lock, no rank files left after the merge
    assert (out / "run_config.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".cyclex-run.lock")) == [".cyclex-run.lock"]
    assert list((out / SHARDS_DIR).iterdir()) == []


@pytest.mark.parametrize("ids", ["b/1", "a"], ids=["rank0-has-nothing", "rank1-has-nothing"])
def test_fewer_images_than_processes(tmp_path, ids):
    reference = _reference(tmp_path, ids)
    out = tmp_path / "two"
    done = _launch(2, out, tmp_path / "in", ids=ids)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _without_timings(_lines(out)) == _without_timings(reference)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p["n_images"] for p in summary["processes"]["per_process"]) == [0, 1]


def test_a_killed_rank_is_resumed_with_another_process_count_redoing_nothing(tmp_path):
    reference = _reference(tmp_path)
    out = tmp_path / "run"
    # rank 1 dies (os._exit 9) at its 3rd generator call: after its first batch of 2 images is written
    first = _launch(2, out, tmp_path / "in", env={"CYCLEX_TEST_DIE": "1:3"})
    assert first.returncode != 0
    done_before = _record_times(out)
    finished_images = {Path(k).parent.name for k in done_before if k.endswith("_complete.json")}
    assert finished_images and len(finished_images) < len(QUERIES)
    # resumed on 3 processes (an uneven split: 2, 3 and 3 images)
    second = _launch(3, out, tmp_path / "in")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _without_timings(_lines(out)) == _without_timings(reference)
    after = _record_times(out)
    assert {k: after[k] for k in done_before} == done_before  # nothing done was redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images_done"] == len(QUERIES)
    explained = sum(p["n_images_explained"] for p in summary["processes"]["per_process"])
    assert explained == len(QUERIES) - len(finished_images)
    # and once more with one process: nothing left, the merge alone gives the same file
    again = rf.run_explainer(make_explainer(), make_queries(tmp_path / "in", write=False), out, batch_size=2,
                             progress=False, run_settings={"test_steps": 0})
    assert again["n"] == len(reference) and _record_times(out) == after


def test_rank_zero_refusing_the_folder_stops_every_rank_before_it_writes(tmp_path):
    out = tmp_path / "run"
    make_queries(tmp_path / "in")
    first = _launch(2, out, tmp_path / "in", ids="a,b/1", extra=("--steps", "1"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = _record_times(out)
    second = _launch(2, out, tmp_path / "in", extra=("--steps", "2"))  # other settings: refused
    assert second.returncode != 0
    assert "different settings" in second.stderr and "test_steps" in second.stderr
    assert "rank 0 refused the run folder" in second.stderr  # rank 1 was told, did not go on alone
    assert _record_times(out) == before


def test_accelerate_launch_command_runs_the_cyclex_module():
    command = accelerate_launch_command(["explain", "--out", "RUN"], 4, main_process_port=29511)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--main_process_port") + 1] == "29511"
    assert command[-4:] == ["cyclex", "explain", "--out", "RUN"]
    with pytest.raises(ValueError, match="num_processes must be >= 2"):
        accelerate_launch_command([], 1)


def test_images_the_generator_fails_on_are_listed_once_and_retried(tmp_path):
    make_queries(tmp_path / "in")
    out = tmp_path / "run"
    # only "c d" has both effusion and edema: its batch fails, is retried image by image, and "c d" fails alone
    first = _launch(2, out, tmp_path / "in", env={"CYCLEX_TEST_FAIL_BRIGHT": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(line["id"], line["stage"]) for line in skipped] == [("c d", "generator")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images_failed"] == 1 and summary["n_images_done"] == len(QUERIES) - 1
    assert list((out / SHARDS_DIR).iterdir()) == []  # the ranks' lists were folded into skipped.jsonl
    # the generator fixed: a rerun on 3 processes does "c d" alone and the list goes
    second = _launch(3, out, tmp_path / "in")
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (out / "skipped.jsonl").exists()
    assert json.loads((out / "summary.json").read_text())["n_images_done"] == len(QUERIES)
    explained = [p["n_images_explained"] for p in json.loads((out / "summary.json").read_text())["processes"][
        "per_process"]]
    assert sum(explained) == 1


def test_a_maker_logging_into_the_run_folder_logs_per_rank_and_rank_zero_folds_the_logs(tmp_path, monkeypatch):
    """The search's hooks: start_run(out, rank) on every rank, merge_ranks + finish_run on rank 0."""
    monkeypatch.setenv("CYCLEX_TEST_RANK_LOG", "1")
    _reference(tmp_path)
    single = (tmp_path / "single" / "search_attempts.jsonl").read_text().splitlines()
    out = tmp_path / "two"
    done = _launch(2, out, tmp_path / "in")
    assert done.returncode == 0, done.stderr[-3000:]
    merged = (out / "search_attempts.jsonl").read_text().splitlines()
    assert sorted(merged) == sorted(single) and len(set(merged)) == len(merged)  # every request once
    assert json.loads((out / "rank_log_finished.json").read_text())["n"] == len(single)
    assert list((out / SHARDS_DIR).iterdir()) == []  # the rank logs were folded in and removed
