"""Run folders: cyclex writes and deletes only what it can prove is its own, one writer at a time, and a
killed run's leftovers are cleaned (issue 18, defects 1, 2 and 10). The lock tests use real processes."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_generator, query
from PIL import Image

from cyclex.cycle import CyclicExplainer
from cyclex.cycle import run_folder as rf
from cyclex.cycle import run_ownership as ro
from cyclex.run_lock import LOCK_NAME, FolderLock, FolderLockedError

TESTS = Path(__file__).parent
QUERIES = {"a": (0.9, 0.9, 0.1), "b": (0.9, 0.1, 0.1), "c": (0.9, 0.9, 0.9)}


def _records(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, values in QUERIES.items():
        path = folder / f"{image_id}.png"
        Image.fromarray(np.uint8(query(*values)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": image_id, "image": str(path), "chest_box": [0, 0, 32, 32]})
    return records


def _explainer(maker=None) -> CyclicExplainer:
    return CyclicExplainer(brightness_generator(), KeywordLabeler(), maker or PaintingMaker(), frame_threshold=95)


def _run(records, out, **kwargs) -> dict:
    return rf.run_explainer(kwargs.pop("explainer", None) or _explainer(), records, out, progress=False, **kwargs)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _marker(out: Path) -> dict:
    return json.loads((out / ro.MARKER_NAME).read_text())


# -- defect 1: --overwrite deletes only what cyclex wrote ------------------------------------------------
@pytest.mark.parametrize("config_text", ["this is not JSON", '{"experiment": "mine", "lr": 0.1}', "[1, 2]"])
def test_overwrite_never_deletes_a_folder_that_only_has_a_file_named_run_config(tmp_path, config_text):
    records = _records(tmp_path / "in")
    stranger = tmp_path / "thesis"
    stranger.mkdir()
    (stranger / "run_config.json").write_text(config_text)
    (stranger / "chapter1.tex").write_text("years of work")
    before = _tree(stranger)
    for overwrite in (False, True):
        with pytest.raises(rf.RunFolderError, match="not a cyclex run folder"):
            _run(records, stranger, overwrite=overwrite)
    assert _tree(stranger) == before  # not even a lock file was written into it


def test_run_folder_has_a_marker_and_overwrite_gives_a_new_run_id(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    _run(records, out)
    marker = _marker(out)
    assert marker["format"] == "cyclex-run" and marker["format_version"] == 1 and len(marker["run_id"]) == 32
    _run(records, out)  # a resume keeps the run
    assert _marker(out)["run_id"] == marker["run_id"]
    _run(records, out, findings=["Cardiomegaly"], overwrite=True)
    assert _marker(out)["run_id"] != marker["run_id"]


def test_overwrite_keeps_files_cyclex_did_not_write_and_never_follows_links(tmp_path):
    from cyclex.cycle.report_html import write_run_report
    from cyclex.explain.evaluate_run import EvaluationConfig, evaluate_run

    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    _run(records, out)
    write_run_report(out)
    evaluate_run(out, classifier=None, config=EvaluationConfig(draw_figures=True))
    ours, _, foreign = ro.scan_run_folder(out)
    assert foreign == [] and any(p.name == "index.html" for p in ours) and (out / "metrics.jsonl").is_file()

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.csv").write_text("1,2,3")
    (out / "notes.txt").write_text("my notes on this run")
    (out / "items" / "a" / "cardiomegaly" / "my_annotation.txt").write_text("the heart is big")
    (out / "records" / "a" / "reviewed.json.bak").write_text("{}")
    (out / "mine").mkdir()
    (out / "mine" / "results.jsonl").write_text("mine")
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "records" / "b" / "link.txt").symlink_to(outside / "data.csv")
    _run(records, out, findings=["Cardiomegaly"], overwrite=True)

    assert (out / "notes.txt").read_text() == "my notes on this run"
    assert (out / "items" / "a" / "cardiomegaly" / "my_annotation.txt").read_text() == "the heart is big"
    assert (out / "records" / "a" / "reviewed.json.bak").is_file() and (out / "mine" / "results.jsonl").is_file()
    assert (out / "link").is_symlink() and (outside / "data.csv").read_text() == "1,2,3"
    assert (out / "records" / "b" / "link.txt").is_symlink()
    assert not (out / "index.html").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "figures").exists()
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {x["finding"] for x in lines} == {"Cardiomegaly"} and len(lines) == 3


@pytest.mark.parametrize("linked", ["items", "records/a/extra.json"])
def test_overwrite_refuses_a_symlink_where_the_run_keeps_its_files(tmp_path, linked):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    _run(records, out)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"not ours")
    if linked == "items":
        shutil.rmtree(out / "items")
        (out / "items").symlink_to(outside, target_is_directory=True)
    else:
        (out / linked).symlink_to(outside / "keep.png")
    before = _tree(out)
    with pytest.raises(rf.RunFolderError, match=f"{linked} is a symlink where the run keeps its files"):
        _run(records, out, overwrite=True)
    assert (outside / "keep.png").read_bytes() == b"not ours" and len(list(outside.iterdir())) == 1
    assert _tree(out) == before


@pytest.mark.parametrize("marker_text, message", [
    ("garbage", "not a readable JSON run marker"),
    ('{"format": "something-else", "format_version": 1, "run_id": "' + "a" * 32 + '"}', "format"),
    ('{"format": "cyclex-run", "format_version": 99, "run_id": "' + "a" * 32 + '"}', "newer cyclex"),
    ('{"format": "cyclex-run", "format_version": 1, "run_id": "../../x"}', "run_id"),
])
def test_a_bad_marker_is_refused_with_the_file_named(tmp_path, marker_text, message):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    _run(records, out)
    (out / ro.MARKER_NAME).write_text(marker_text)
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(rf.RunFolderError, match=message) as refused:
            _run(records, out, overwrite=overwrite)
        assert ro.MARKER_NAME in str(refused.value)
    assert _tree(out) == before


def test_run_folders_of_earlier_cyclex_resume_and_start_over_only_when_all_files_are_ours(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    _run(records, out)
    (out / ro.MARKER_NAME).unlink()  # as an earlier cyclex left it
    (out / LOCK_NAME).unlink()
    maker = PaintingMaker()
    _run(records, out, explainer=_explainer(maker))  # resumes: nothing left to do, and gets its marker
    assert maker.requests == 0 and _marker(out)["format"] == "cyclex-run"

    (out / ro.MARKER_NAME).unlink()
    with pytest.raises(rf.RunSettingsChanged):  # other settings: refused as before (the demo then overwrites)
        _run(records, out, findings=["Edema"])
    assert not (out / ro.MARKER_NAME).exists()
    (out / "thesis.tex").write_text("not a run file")
    with pytest.raises(rf.RunFolderError, match="delete .* by hand") as refused:
        _run(records, out, findings=["Edema"], overwrite=True)
    assert "thesis.tex" in str(refused.value) and (out / "results.jsonl").is_file()
    (out / "thesis.tex").unlink()
    summary = _run(records, out, findings=["Edema"], overwrite=True)
    assert summary["n"] == 1 and _marker(out)["format"] == "cyclex-run"


def test_the_demo_starts_its_own_earlier_cyclex_run_over(tmp_path, monkeypatch):
    """`make demo` after an upgrade: the demo's folder has no marker and other settings; run_demo starts it over."""
    from cyclex.demo import run_demo as demo

    records = _records(tmp_path / "in")
    out = tmp_path / "demo"
    _run(records, out / "clean", findings=["Edema"])
    (out / "clean" / ro.MARKER_NAME).unlink()
    calls = []

    def run_explain(generator, tailored, phantoms, run_out, **kwargs):
        calls.append(kwargs["overwrite"])
        return _run(records, run_out, overwrite=kwargs["overwrite"])

    monkeypatch.setattr(demo, "demo_assets", lambda names: {n: {"tailored": tmp_path} for n in names})
    monkeypatch.setattr(demo, "demo_query_phantoms", lambda n: [])
    monkeypatch.setattr(demo, "shortcut_marker_overlap", lambda run: {})
    monkeypatch.setattr(rf, "run_explain", run_explain)
    import cyclex.cycle.report_html
    import cyclex.datasets.phantom
    import cyclex.specs.generators

    monkeypatch.setattr(cyclex.specs.generators, "load_generator", lambda spec: brightness_generator())
    monkeypatch.setattr(cyclex.datasets.phantom, "write_phantom_folder", lambda phantoms, folder: None)
    monkeypatch.setattr(demo, "write_query_folder", lambda phantoms, folder: None)
    monkeypatch.setattr(cyclex.datasets.phantom, "read_phantom_folder", lambda folder: [])
    monkeypatch.setattr(cyclex.cycle.report_html, "write_run_report", lambda run: None)
    monkeypatch.setattr(cyclex.cycle.report_html, "write_comparison_report", lambda runs, page: page)
    demo.run_demo(out, n_images=1, names=("clean",), progress=False)
    assert calls == [False, True] and _marker(out / "clean")["format"] == "cyclex-run"
    demo.run_demo(out, n_images=1, names=("clean",), progress=False)  # the second `make demo` resumes
    assert calls == [False, True, False]


# -- defect 2: one writer per run folder (real second processes) -----------------------------------------
CHILD_RUN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_generator
    from cyclex.cycle import CyclicExplainer
    from cyclex.cycle import run_folder as rf

    go = Path(sys.argv[4])

    class WaitingMaker(PaintingMaker):
        def make(self, *args, **kwargs):
            while not go.exists():  # holds the run (and its lock) open until the test says go
                time.sleep(0.05)
            return super().make(*args, **kwargs)

    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), WaitingMaker(), frame_threshold=95)
    rf.run_explainer(explainer, json.loads(Path(sys.argv[2]).read_text()), sys.argv[3], batch_size=2, progress=False)
""")


def _holder_pid(out: Path) -> int | None:
    try:
        return json.loads((out / LOCK_NAME).read_text()).get("pid")
    except (OSError, json.JSONDecodeError):
        return None


def _wait_for_lock(out: Path, pid: int, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _holder_pid(out) != pid:
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline, f"the child never locked {out}"
        time.sleep(0.1)


def test_a_second_run_and_overwrite_are_refused_while_a_run_lives(tmp_path):
    records = _records(tmp_path / "in")
    (tmp_path / "records.json").write_text(json.dumps(records))
    out, go = tmp_path / "run", tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", CHILD_RUN, str(TESTS), str(tmp_path / "records.json"), str(out),
                              str(go)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(out, child.pid, child)
        before = _tree(out)
        for overwrite in (False, True):
            with pytest.raises(rf.RunFolderBusy, match=f"pid {child.pid} on host") as busy:
                _run(records, out, overwrite=overwrite)
            assert str(out) in str(busy.value) and busy.value.holder["pid"] == child.pid
        with pytest.raises(rf.RunFolderBusy):  # other settings are refused as busy too, before any deletion
            _run(records, out, findings=["Edema"], overwrite=True)
        assert _tree(out) == before
    finally:
        go.touch()
        _, errors = child.communicate(timeout=120)
    assert child.returncode == 0, errors
    maker = PaintingMaker()
    _run(records, out, explainer=_explainer(maker))  # the lock went with the run: resuming works, nothing to redo
    assert maker.requests == 0 and _holder_pid(out) is None
    reference = tmp_path / "reference"
    _run(records, reference)
    assert (out / "results.jsonl").read_text().count("\n") == (reference / "results.jsonl").read_text().count("\n")


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    records = _records(tmp_path / "in")
    (tmp_path / "records.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CHILD_RUN, str(TESTS), str(tmp_path / "records.json"), str(out),
                              str(tmp_path / "never")], stderr=subprocess.PIPE, text=True)
    _wait_for_lock(out, child.pid, child)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert _holder_pid(out) == child.pid  # its record is still there, but the kernel dropped its lock
    summary = _run(records, out)
    assert summary["n_images_done"] == 3 and _holder_pid(out) is None


HOLD_WITH_ORPHAN = textwrap.dedent("""
    import os, sys, time
    from cyclex.run_lock import FolderLock
    FolderLock(sys.argv[1]).acquire()
    orphan = os.fork()
    if orphan == 0:  # a child (think data-loader worker) inherits the open lock file and outlives the run
        quiet = os.open(os.devnull, os.O_RDWR)
        os.dup2(quiet, 1)  # let go of the test's pipes
        os.dup2(quiet, 2)
        time.sleep(600)
        os._exit(0)
    print(orphan, flush=True)
    os._exit(0)  # the run itself dies without releasing
""")


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    child = subprocess.run([sys.executable, "-c", HOLD_WITH_ORPHAN, str(folder)], capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == 0 and child.stdout.strip().isdigit(), child.stderr
    orphan, dead_pid = int(child.stdout), _holder_pid(folder)
    try:
        with pytest.raises(BlockingIOError):  # the orphan still holds the flock of the lock file
            fd = os.open(folder / LOCK_NAME, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        with caplog.at_level(logging.WARNING, logger="cyclex.run_lock"):
            with FolderLock(folder) as lock:
                assert _holder_pid(folder) == os.getpid() and lock.held
                # and the taken-over lock excludes others as usual
                other = subprocess.run([sys.executable, "-c", "import sys; from cyclex.run_lock import FolderLock; "
                                        "FolderLock(sys.argv[1]).acquire()", str(folder)],
                                       capture_output=True, text=True, timeout=60)
                assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
        assert f"took over the stale lock of pid {dead_pid}" in caplog.text
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_a_lock_recorded_by_another_host_is_reported_not_broken(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"pid": 4242, "host": "gpu-node-7", "since": "2030-01-01T00:00:00+00:00", "owner": "cyclex"}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(FolderLockedError, match="another machine: pid 4242 on host 'gpu-node-7'") as refused:
        FolderLock(folder).acquire()
    assert str(folder / LOCK_NAME) in str(refused.value)
    assert json.loads((folder / LOCK_NAME).read_text()) == record


def test_without_flock_the_pid_record_decides(tmp_path, monkeypatch):
    import errno

    import cyclex.run_lock as run_lock

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "no locks available")

    folder = tmp_path / "run"
    folder.mkdir()
    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (folder / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(FolderLockedError, match=f"pid {sleeper.pid}"):
            FolderLock(folder).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with FolderLock(folder):  # the recorded process ended: the folder is free
        assert _holder_pid(folder) == os.getpid()


# -- defect 10: temporary files of killed writes are cleaned by the next run -----------------------------
KILLED_WRITE = textwrap.dedent("""
    import sys, time
    from cyclex.atomic_io import atomic_write
    def slow(handle):
        handle.write(b"half of a results file")
        handle.flush()
        print("writing", flush=True)
        time.sleep(600)
    atomic_write(sys.argv[1], slow)
""")


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    _run(records, out)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(out / "items" / "a" / "cardiomegaly" /
                                                                    "query.png")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftover = list((out / "items" / "a" / "cardiomegaly").glob(".query.png.*.tmp"))
    assert len(leftover) == 1 and f".{writer.pid}-" in leftover[0].name
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        in_flight = out / f".summary.json.{live.pid}-abcd1234.tmp"  # a live writer's: kept
        in_flight.write_text("{")
        users = out / ".notes.tmp"  # not named like cyclex's temporaries: kept
        users.write_text("mine")
        _run(records, out)
        assert not leftover[0].exists() and in_flight.exists() and users.read_text() == "mine"
    finally:
        live.kill()
        live.wait()
