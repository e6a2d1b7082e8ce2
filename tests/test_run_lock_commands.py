"""Issue 18, defect 2: `evaluate`, `report` and `train-tailored` take the folder's lock like `explain`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from _tailored_helpers import save_tiny_base, write_images
from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_generator, query
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.cycle import CyclicExplainer
from cyclex.cycle import run_folder as rf
from cyclex.cycle.report_html import RunReportError, write_run_report
from cyclex.cycle.run_ownership import locked_run_folder

HOLD = textwrap.dedent("""
    import sys, time
    from cyclex.run_lock import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder():
    """Start a process that holds the lock of a folder until the test ends."""
    children = []

    def hold(folder):
        child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "held"
        children.append(child)
        return child

    yield hold
    for child in children:
        child.kill()
        child.wait(timeout=30)


def _finished_run(tmp_path):
    out = tmp_path / "run"
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker())
    records = [{"id": "a", "image": query(0.9, 0.9)[0].numpy()}]
    rf.run_explainer(explainer, records, out, progress=False)
    return out


def test_report_and_evaluate_refuse_a_run_another_process_writes(tmp_path, holder):
    out = _finished_run(tmp_path)
    page = write_run_report(out)
    before = page.read_bytes()
    child = holder(out)
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 1 and f"pid {child.pid}" in report.output
    assert page.read_bytes() == before
    evaluate = CliRunner().invoke(app, ["evaluate", str(out), "--classifier", "none", "--encoder", "none",
                                        "--lpips", "none", "--no-figures"])
    assert evaluate.exit_code == 1 and f"pid {child.pid}" in " ".join(evaluate.output.split())
    assert not (out / "metrics.jsonl").exists()
    child.kill()
    child.wait(timeout=30)
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0  # the kernel dropped the dead holder's lock


def test_a_report_written_while_this_process_holds_the_lock_is_fine(tmp_path):
    out = _finished_run(tmp_path)
    with locked_run_folder(out):  # re-entrant within one process (the run writing its own page)
        assert write_run_report(out).is_file()
    with pytest.raises(RunReportError, match="does not exist"):
        write_run_report(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()  # a missing run is reported, never made


def test_train_tailored_refuses_a_folder_another_trainer_holds(tmp_path, holder):
    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    write_images(tmp_path / "images", 2, size=32)
    out = tmp_path / "tailored"
    out.mkdir()
    child = holder(out)
    result = CliRunner().invoke(app, [
        "train-tailored", "--generator", "python:_tailored_helpers:disc_reports", "--images", str(tmp_path / "images"),
        "--base", str(base), "--out", str(out), "--max-steps", "1", "--resolution", "32", "--batch-size", "2",
        "--overwrite",
    ])
    assert result.exit_code == 2 and f"pid {child.pid}" in " ".join(result.output.split())
    assert sorted(p.name for p in out.iterdir()) == [".cyclex-run.lock"]  # nothing written, nothing deleted
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, [
        "train-tailored", "--generator", "python:_tailored_helpers:disc_reports", "--images", str(tmp_path / "images"),
        "--base", str(base), "--out", str(tmp_path / "file"), "--max-steps", "1"])
    assert result.exit_code == 2 and "is a file" in result.output


def test_a_run_starting_in_its_folder_is_busy_not_a_foreign_folder(tmp_path, holder):
    """A run that holds the lock but has not written its marker yet (a temp file only): busy, not refused."""
    from cyclex.cycle.run_ownership import RunFolderBusy, RunFolderError

    out = tmp_path / "run"
    out.mkdir()
    child = holder(out)
    (out / ".run_config.json.tmp-123").write_text("{")  # what a starting run may show for a moment
    with pytest.raises(RunFolderBusy, match=f"pid {child.pid}"):
        with locked_run_folder(out):
            pass
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a cyclex run folder"):  # no lock: still a foreign folder
        with locked_run_folder(foreign):
            pass
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written into it
