"""kill -9 trials of issue 18: `explain` and `train-tailored` killed at random moments, then resumed.

Each trial starts the real command in a child process and kills it with SIGKILL, either after a
random delay or at a random one of its own writes (inside an atomic write, after half the bytes; or,
for training, inside a checkpoint save). The same command is then rerun until it finishes. A trial
passes when the resumed run equals an uninterrupted one (every result line and item file for
explain; the final weights, to 1e-6, and the checkpoint list for training), no temporary or partial
file is left visible, and the lock is free (the rerun was not refused, the lock record is empty).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks.reliability_corpus import GOOD, SIDE, Fixtures, good_folder

ROOT = Path(__file__).resolve().parents[1]

# The child: the cyclex command line, killed by itself at the K-th atomic write (half written) or the
# K-th checkpoint save, when asked.
CHILD = textwrap.dedent("""
    import os, signal, sys
    mode, k = sys.argv[1], int(sys.argv[2])
    calls = [0]

    def should_die():
        calls[0] += 1
        return calls[0] == k

    if mode == "write":
        import cyclex.atomic_io as atomic_io
        real = atomic_io.atomic_write

        def dying(path, write, mode="wb"):
            if not should_die():
                return real(path, write, mode)

            def half_then_die(handle):
                handle.write(b"partial" if "b" in mode else "partial")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            return real(path, half_then_die, mode)

        atomic_io.atomic_write = dying
    elif mode == "save":
        import accelerate.accelerator
        real_save = accelerate.accelerator.save_accelerator_state

        def dying_save(output_dir, *args, **kwargs):
            if should_die():
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(output_dir, *args, **kwargs)

        accelerate.accelerator.save_accelerator_state = dying_save
    from cyclex.cli import app
    sys.argv = ["cyclex", *sys.argv[3:]]
    app()
""")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CYCLEX_QUIET": "1"}


def _run(args: list[str], *, mode: str = "none", k: int = 0, kill_after_s: float | None = None,
         timeout_s: float = 600) -> int:
    """Run the command in a child; kill it after `kill_after_s` when given. Returns its exit code."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(k), *args], env=_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = child.communicate(timeout=kill_after_s if kill_after_s is not None else timeout_s)
    except subprocess.TimeoutExpired:
        if kill_after_s is None:
            child.kill()
            child.communicate()
            raise
        child.send_signal(signal.SIGKILL)
        child.communicate()
        return -signal.SIGKILL
    if child.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"cyclex {' '.join(args[:1])} failed ({child.returncode}): {err[-2000:]}")
    return child.returncode


def _kill_in_time(args: list[str], out: Path, delay: float) -> tuple[int, float]:
    """Kill the run after `delay` s; when it finished first (a fast run), start over with half the delay."""
    for _ in range(5):
        code = _run(args, kill_after_s=delay)
        if code == -signal.SIGKILL:
            break
        shutil.rmtree(out, ignore_errors=True)
        delay /= 2
    return code, delay


def _temp_leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or p.name.endswith(".partial") or ".partial" in p.parts)


def _lock_free(folder: Path) -> bool:
    lock = folder / ".cyclex-run.lock"
    return not lock.exists() or not lock.read_text().strip()


def _resume(args: list[str], folder: Path) -> tuple[int, bool]:
    """Rerun until it finishes (a killed write may leave work; never more than 3 reruns). (reruns, lock ok)."""
    for attempt in range(1, 4):
        if _run(args) == 0:
            return attempt, _lock_free(folder)
    return 3, False


# -- explain ------------------------------------------------------------------------------------------
def _explain_args(images: Path, out: Path, tailored: Path) -> list[str]:
    return ["explain", "--generator", GOOD, "--tailored", str(tailored), "--images", str(images), "--out", str(out),
            "--steps", "2", "--labeler", "rules", "--batch-size", "1"]


# wall-clock measurements and dates: the only fields a resumed run may differ in
_VOLATILE = {"seconds", "seconds_batch", "seconds_this_run", "timings", "date", "started", "finished", "created",
             "git_commit", "git_dirty"}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _explain_state(out: Path) -> dict[str, Any]:
    import hashlib

    lines = sorted((json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()),
                   key=lambda r: (r["image_id"], r["finding"]))
    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((out / "items").rglob("*")) if p.is_file()}
    summary = _strip(json.loads((out / "summary.json").read_text()))
    return {"results": _strip(lines), "files": files, "summary": summary}


def _reference_seconds(args: list[str]) -> float:
    """Run the uninterrupted reference once; its wall time bounds the random kill times."""
    started = time.perf_counter()
    _run(args)
    return time.perf_counter() - started


def _trial_row(command: str, trial: int, mode: str, k: int, delay: float | None, code: int, reruns: int,
               same: bool, leftovers: list[str], lock_ok: bool) -> dict[str, Any]:
    return {"command": command, "trial": trial, "mode": mode, "k": k,
            "kill_after_s": None if delay is None else round(delay, 2), "killed": code == -signal.SIGKILL,
            "reruns": reruns, "identical": same, "leftovers": leftovers, "lock_free": lock_ok,
            "mismatch": not (same and lock_ok and not leftovers)}


def explain_trials(n: int, work: Path, fixtures: Fixtures, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    images = good_folder(work / "images", n=4)
    reference = work / "reference"
    full_s = _reference_seconds(_explain_args(images, reference, fixtures.tailored))
    expected = _explain_state(reference)
    n_writes = len(list((reference / "items").rglob("*"))) + 2 * len(expected["results"]) + 6
    trials = []
    for trial in range(n):
        out = work / f"trial{trial}"
        if trial % 2 == 0:
            mode, k = "time", 0
            code, delay = _kill_in_time(_explain_args(images, out, fixtures.tailored), out,
                                        rng.uniform(0.2 * full_s, 0.9 * full_s))
        else:
            mode, k, delay = "write", rng.randint(1, n_writes), None
            code = _run(_explain_args(images, out, fixtures.tailored), mode="write", k=k)
        reruns, lock_ok = _resume(_explain_args(images, out, fixtures.tailored), out)
        leftovers = _temp_leftovers(out)
        same = out.is_dir() and (out / "results.jsonl").is_file() and _explain_state(out) == expected
        trials.append(_trial_row("explain", trial, mode, k, delay, code, reruns, same, leftovers, lock_ok))
        shutil.rmtree(out, ignore_errors=True)
    return trials


# -- train-tailored --------------------------------------------------------------------------------------
def _train_args(images: Path, out: Path, base: Path) -> list[str]:
    return ["train-tailored", "--generator", GOOD, "--images", str(images), "--base", str(base), "--out", str(out),
            "--max-steps", "6", "--checkpointing-steps", "2", "--resolution", str(SIDE), "--batch-size", "2",
            "--no-select"]


def _weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def _same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def train_trials(n: int, work: Path, fixtures: Fixtures, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    images = good_folder(work / "images", n=4)
    reference = work / "reference"
    full_s = _reference_seconds(_train_args(images, reference, fixtures.tailored))
    expected = _weights(reference)
    checkpoints = sorted(p.name for p in (reference / "checkpoints").iterdir())
    trials = []
    for trial in range(n):
        out = work / f"trial{trial}"
        mode = ("time", "save", "write")[trial % 3]
        k, delay = 0, None
        if mode == "time":
            code, delay = _kill_in_time(_train_args(images, out, fixtures.tailored), out,
                                        rng.uniform(0.2 * full_s, 0.9 * full_s))
        else:
            k = rng.randint(1, 3) if mode == "save" else rng.randint(1, 12)
            code = _run(_train_args(images, out, fixtures.tailored), mode=mode, k=k)
        reruns, lock_ok = _resume(_train_args(images, out, fixtures.tailored), out)
        leftovers = _temp_leftovers(out)
        same = (out / "unet").is_dir() and _same_weights(_weights(out), expected) and \
            sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
        trials.append(_trial_row("train-tailored", trial, mode, k, delay, code, reruns, same, leftovers, lock_ok))
        shutil.rmtree(out, ignore_errors=True)
    return trials
