"""Issue 18, defect 7: `cyclex demo --out` never writes into a folder cyclex did not make; `--n` grows the queries."""

from __future__ import annotations

import json

import pytest
from cycle_fakes import brightness_generator
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.cycle import run_folder as rf
from cyclex.cycle.run_ownership import RunFolderError


@pytest.fixture
def demo(monkeypatch, tmp_path):
    """run_demo without models: fake assets and generator; the runs record which phantoms they got."""
    import cyclex.cycle.audit_report
    import cyclex.cycle.report_html
    import cyclex.specs.generators
    from cyclex.demo import run_demo as demo

    runs = []

    def fake_run_explain(generator, tailored, records, out, **kwargs):
        runs.append([r["id"] for r in records])
        return {"cyclic_rate": None, "n": 0, "per_finding": {}}

    monkeypatch.setattr(demo, "demo_assets", lambda names: {n: {"tailored": tmp_path} for n in names})
    monkeypatch.setattr(demo, "shortcut_marker_overlap", lambda run: {"overlap_rate": None})
    monkeypatch.setattr(rf, "run_explain", fake_run_explain)
    monkeypatch.setattr(cyclex.specs.generators, "load_generator", lambda spec: brightness_generator())
    monkeypatch.setattr(cyclex.cycle.report_html, "write_run_report", lambda out: None)
    monkeypatch.setattr(cyclex.cycle.report_html, "write_comparison_report",
                        lambda runs, out: out.write_text("demo page") or out)
    demo.runs = runs
    return demo


def test_a_user_folder_is_refused_and_left_as_it_was(demo, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "comparison.html").write_text("my own page")  # a name the demo writes, made by someone else
    with pytest.raises(RunFolderError, match="not a cyclex demo folder"):
        demo.run_demo(folder, n_images=1, names=("clean",), progress=False)
    assert [p.name for p in folder.iterdir()] == ["comparison.html"]
    assert (folder / "comparison.html").read_text() == "my own page" and demo.runs == []
    result = CliRunner().invoke(app, ["demo", "--out", str(folder), "--n", "1"])
    assert result.exit_code == 2 and "not a cyclex demo folder" in " ".join(result.output.split())
    assert (folder / "comparison.html").read_text() == "my own page"


@pytest.mark.parametrize("kind", ["file", "symlinked marker", "foreign marker"])
def test_files_and_false_markers_are_refused(demo, tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("a file")
    else:
        target.mkdir()
        marker = target / demo.DEMO_MARKER_NAME
        if kind == "symlinked marker":
            (tmp_path / "elsewhere.json").write_text(json.dumps({"format": demo.DEMO_MARKER_FORMAT}))
            marker.symlink_to(tmp_path / "elsewhere.json")
        else:
            marker.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(RunFolderError):
        demo.run_demo(target, n_images=1, names=("clean",), progress=False)
    assert demo.runs == []


def test_new_empty_marked_and_older_demo_folders_are_the_demos(demo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        demo.run_demo(out, n_images=1, names=("clean",), progress=False)
        assert json.loads((out / demo.DEMO_MARKER_NAME).read_text())["format"] == demo.DEMO_MARKER_FORMAT
        demo.run_demo(out, n_images=1, names=("clean",), progress=False)  # its own folder: resumed
    older = tmp_path / "older"  # an earlier cyclex's demo: its comparison and query phantoms, no marker
    demo.run_demo(older, n_images=1, names=("clean",), progress=False)
    (older / demo.DEMO_MARKER_NAME).unlink()
    demo.run_demo(older, n_images=1, names=("clean",), progress=False)
    assert len(demo.runs) == 6


def test_a_larger_n_explains_more_phantoms_and_keeps_the_first(demo, tmp_path):
    out = tmp_path / "demo"
    demo.run_demo(out, n_images=2, names=("clean",), progress=False)
    demo.run_demo(out, n_images=3, names=("clean",), progress=False)
    demo.run_demo(out, n_images=2, names=("clean",), progress=False)
    first, grown, again = demo.runs
    assert len(first) == 2 and len(grown) == 3 and grown[:2] == first and again == first
