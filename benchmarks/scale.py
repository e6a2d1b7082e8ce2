"""Explain at scale on the demo world, CPU: 1 against 2 processes (accelerate, gloo), a killed rank, Ray.

    python -m benchmarks.scale [--n 16] [--steps 50] [--ray-python PATH]

Writes benchmarks/results/scale.json (fresh each time; work folders in benchmarks/.work/scale):
- `accelerate.identical_results`: the 2-process run's results.jsonl equals the 1-process one item for
  item (every field but the timings and the maker's per-batch bookkeeping: batch size, seconds, UNet
  calls per batch); `accelerate.maps_bitwise_identical` / `maps_max_abs_difference`: the saved signed
  and positive maps (float32 on [-1, 1]) too, or by how much they differ.
- `accelerate.speedup_2_vs_1`: wall-clock of the 1-process command over the 2-process one (each
  includes starting Python and loading the models in every process); `accelerate.items_per_second`
  per process count, on the wall clock and on the explain phase alone (summary seconds).
- `accelerate.resume_other_process_count_ok`: a 2-process run whose rank 1 is killed with SIGKILL
  once a few images are done, resumed with 1 process, ends with the reference results (nothing lost,
  nothing twice) and rewrites none of the items finished before the kill.
- `ray`: the same with `--engine ray` (2 CPU workers of a local Ray instance) where `import ray`
  works in `--ray-python`'s interpreter, else the reason it could not run.
No GPU figure here (none measured on this machine): a GPU figure goes to its own file with provenance.

Queries: the demo's held-out query phantoms (seed registry `demo_queries`, purpose "query": no
shipped model, threshold or setting was trained, calibrated or chosen on them); generator
demo:shortcut with its tailored SD, the demo's settings (omega 1, checkpoint "final"). No scorer makes
any figure here: verdicts come from the demo generator and the rule labeler, the figures are counts,
identity checks and timings. The machine is a shared 2-core CPU: its load average is recorded, and a
2-process speedup on it says little about GPUs, where each process has its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
WORK = Path(__file__).resolve().parent / ".work" / "scale"
# Per-batch bookkeeping of the DDIM maker: how big the batch was and how long it took, not the item
BATCH_BOOKKEEPING = ("seconds", "seconds_batch", "batch_size", "unet_calls", "unet_calls_batch", "start_index")


def comparable(line: dict[str, Any]) -> dict[str, Any]:
    """A result line less what depends on the batch it was made in or on the clock."""
    details = {k: v for k, v in line.get("maker_details", {}).items() if k not in BATCH_BOOKKEEPING}
    return {**{k: v for k, v in line.items() if k not in ("timings", "maker_details")}, "maker_details": details}


def read_lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines() if x.strip()]


def maps_difference(a: Path, b: Path) -> float:
    """The largest |difference| between the saved signed and positive maps of two runs (0.0: bitwise equal).

    Batches of another composition may change the last float bits of the UNet's output (CPU kernels
    reduce in another order); the verdicts, reports and frames are compared exactly elsewhere.
    """
    largest = 0.0
    for line in read_lines(a):
        for key in ("signed_npy", "positive_npy"):
            left, right = np.load(a / line["files"][key]), np.load(b / line["files"][key])
            largest = max(largest, float(np.abs(left.astype(np.float64) - right).max()))
    return largest


def record_times(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "records").rglob("*.json")}


def environment_for_runs() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def explain_args(queries: Path, tailored: Path, out: Path, steps: int) -> list[str]:
    return ["explain", "--generator", "demo:shortcut", "--tailored", str(tailored), "--images", str(queries),
            "--out", str(out), "--steps", str(steps), "--guidance", "1", "--checkpoint", "final", "--batch-size", "4"]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=environment_for_runs(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def throughput(run: Path, wall_s: float) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    per_process = summary.get("processes", {}).get("per_process")
    explain_s = max(p["seconds"] for p in per_process) if per_process else summary["seconds_this_run"]
    return {"n_items": summary["n"], "wall_s": round(wall_s, 2), "explain_s": round(explain_s, 2),
            "items_per_second_wall": round(summary["n"] / wall_s, 4),
            "items_per_second_explain": round(summary["n"] / explain_s, 4) if explain_s else None}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _local_rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"LOCAL_RANK="):
            return int(item.split(b"=", 1)[1])
    return None


def kill_rank_mid_run(launch: list[str], out: Path, after_images: int, rank: int = 1) -> dict[str, Any]:
    """Start `launch`, SIGKILL the process of `rank` once `after_images` images are complete; wait for the end."""
    process = subprocess.Popen(launch, env=environment_for_runs(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    killed = None
    while process.poll() is None and killed is None:
        complete = len(list((out / "records").glob("*/_complete.json"))) if (out / "records").is_dir() else 0
        if complete >= after_images:
            for pid in _children(process.pid):
                if _local_rank(pid) == rank:
                    os.kill(pid, signal.SIGKILL)
                    killed = {"pid": pid, "rank": rank, "images_complete_at_kill": complete}
        time.sleep(0.2)
    _, stderr = process.communicate()
    return {"killed": killed, "launch_exit_code": process.returncode, "stderr_tail": (stderr or "")[-400:]}


def accelerate_part(queries: Path, tailored: Path, steps: int) -> dict[str, Any]:
    from cyclex.cycle.distributed import accelerate_launch_command

    cyclex = [sys.executable, "-m", "cyclex"]
    one, two, killed = WORK / "one", WORK / "two", WORK / "killed"
    wall_one = timed(cyclex + explain_args(queries, tailored, one, steps))
    wall_two = timed(cyclex + explain_args(queries, tailored, two, steps) + ["--num-processes", "2"])
    reference = read_lines(one)
    identical = [comparable(x) for x in read_lines(two)] == [comparable(x) for x in reference]
    # a rank killed mid-run, resumed with another process count
    kill = kill_rank_mid_run(accelerate_launch_command(explain_args(queries, tailored, killed, steps), 2), killed,
                             after_images=4)
    before = record_times(killed)
    timed(cyclex + explain_args(queries, tailored, killed, steps))  # resumed on 1 process
    after = record_times(killed)
    resumed = read_lines(killed)
    keys = [(x["image_id"], x["finding"]) for x in resumed]
    resume_ok = (kill["killed"] is not None and kill["launch_exit_code"] != 0
                 and [comparable(x) for x in resumed] == [comparable(x) for x in reference]
                 and len(set(keys)) == len(keys) and {k: after.get(k) for k in before} == before)
    return {
        "identical_results": identical,
        "maps_bitwise_identical": maps_difference(one, two) == 0.0,
        "maps_max_abs_difference": maps_difference(one, two),
        "resume_other_process_count_ok": resume_ok,
        "speedup_2_vs_1": round(wall_one / wall_two, 3),
        "items_per_second": {"1_process": throughput(one, wall_one), "2_processes": throughput(two, wall_two)},
        "n_items": len(reference),
        "kill": {**kill, "records_before_resume": len(before), "records_after_resume": len(after),
                 "resumed_with_processes": 1, "items_lost": len(set(map(tuple, [(x["image_id"], x["finding"])
                                                                              for x in reference])) - set(keys)),
                 "items_duplicated": len(keys) - len(set(keys))},
        "backend": "gloo (accelerate launch --multi_gpu without CUDA: MULTI_CPU)",
    }


def ray_part(queries: Path, tailored: Path, steps: int, ray_python: str) -> dict[str, Any]:
    probe = subprocess.run([ray_python, "-c", "import ray, ray.data; print(ray.__version__)"],
                           capture_output=True, text=True, env=environment_for_runs())
    if probe.returncode != 0:
        return {"ran": False, "reason": f"`import ray` fails in {ray_python}: {probe.stderr.strip()[-400:]}"}
    version = probe.stdout.strip()
    one, ray_run = WORK / "one", WORK / "ray"
    cyclex = [ray_python, "-m", "cyclex"]
    wall = timed(cyclex + explain_args(queries, tailored, ray_run, steps) + ["--engine", "ray", "--num-processes", "2"])
    reference = read_lines(one)
    identical = [comparable(x) for x in read_lines(ray_run)] == [comparable(x) for x in reference]
    # resume: drop half the images' records, run again with one worker, same results, the rest untouched
    done = sorted((ray_run / "records").iterdir())
    for folder in done[: len(done) // 2]:
        for path in folder.iterdir():
            path.unlink()
    kept = record_times(ray_run)
    timed(cyclex + explain_args(queries, tailored, ray_run, steps) + ["--engine", "ray", "--num-processes", "1"])
    after = record_times(ray_run)
    resumed = read_lines(ray_run)
    resume_ok = ([comparable(x) for x in resumed] == [comparable(x) for x in reference]
                 and {k: after.get(k) for k in kept} == kept)
    wall_one = json.loads((WORK / "scale_walls.json").read_text())["one"]
    return {"ran": True, "ray_version": version, "identical_results": identical,
            "maps_bitwise_identical": maps_difference(one, ray_run) == 0.0,
            "maps_max_abs_difference": maps_difference(one, ray_run),
            "resume_other_process_count_ok": resume_ok,
            "resume_check": "half the images' records deleted, rerun with 1 worker (Ray has no rank to kill: a "
                            "lost worker's tasks are retried by Ray)",
            "speedup_2_vs_1": round(wall_one / wall, 3),
            "items_per_second": {"2_workers": throughput(ray_run, wall)},
            "python": ray_python}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="held-out demo query phantoms")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the demo's 50)")
    parser.add_argument("--ray-python", default=sys.executable, help="interpreter with ray[data] installed")
    args = parser.parse_args(argv)

    import shutil

    from cyclex.datasets.seed_registry import DEMO_QUERIES, check_held_out
    from cyclex.demo.queries import DEMO_QUERY_SEED, demo_query_phantoms, write_query_folder
    from cyclex.demo.run_demo import demo_assets
    from cyclex.provenance import environment

    shutil.rmtree(WORK, ignore_errors=True)  # fresh every time
    WORK.mkdir(parents=True)
    seeds = check_held_out(DEMO_QUERIES.drawn(args.n, DEMO_QUERY_SEED), "benchmarks/scale.py queries")
    queries = write_query_folder(demo_query_phantoms(args.n), WORK / "queries")
    tailored = demo_assets(["shortcut"])["shortcut"]["tailored"]
    started = time.time()
    result: dict[str, Any] = {
        "what": "cyclex explain on 1 and 2 CPU processes (accelerate, gloo) and on Ray, demo world",
        "generator": "demo:shortcut", "tailored": "demo shortcut tailored SD, checkpoint final",
        "settings": {"steps": args.steps, "guidance": 1.0, "batch_size": 4, "n_images": args.n},
        "query_seeds": seeds, "query_seed_use": DEMO_QUERIES.name,
        "scorers": "none: counts, identity checks and timings only (verdicts from the demo generator + rule labeler)",
        "load_average_at_start": os.getloadavg(),
        "provenance": environment("cpu"),
    }
    result["accelerate"] = accelerate_part(queries, tailored, args.steps)
    (WORK / "scale_walls.json").write_text(json.dumps(
        {"one": result["accelerate"]["items_per_second"]["1_process"]["wall_s"]}))
    try:
        result["ray"] = ray_part(queries, tailored, args.steps, args.ray_python)
    except RuntimeError as error:
        result["ray"] = {"ran": False, "reason": str(error)[-1500:]}
    result["load_average_at_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: result[k] for k in ("accelerate", "ray")}, indent=2)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
