"""The README's `cyclex explain` recipe reproduces `cyclex demo` (issue 16, item 6).

The recipe is read from README.md itself, run on the demo's own query folder with the shipped demo
models (a few images, 5 DDIM steps for both), and must give the demo's verdicts, reports and marker
counts exactly; the true chest boxes reach the results (`alignment_chest_box`) without masking the maps.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS = "5"


def readme_recipe() -> str:
    """The `cyclex explain --generator demo:...` command of the README, continuation lines joined."""
    text = README.read_text()
    match = re.search(r"^cyclex explain --generator demo:\S+.*?(?:\\\n.*?)*$", text, flags=re.M)
    assert match, "README.md has no `cyclex explain --generator demo:...` recipe"
    return match.group(0).replace("\\\n", " ")


def _verdicts(run: Path) -> list[tuple]:
    lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines() if x.strip()]
    return [(x["image_id"], x["finding"], x["verified"], x["report_before"], x["report_after"],
             x["collateral_added"], x["collateral_lost"]) for x in lines]


def test_readme_recipe_reproduces_the_demo(tmp_path, monkeypatch):
    from cyclex.cli import app
    from cyclex.demo.run_demo import shortcut_marker_overlap

    home = tmp_path / "home"
    monkeypatch.setenv("CYCLEX_HOME", str(home))
    demo_out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(demo_out), "--n", "3", "--steps", STEPS])
    assert result.exit_code == 0, result.output
    recipe = readme_recipe()
    assert "--images runs/demo/phantoms" in recipe and "demo:shortcut" in recipe
    for name in ("shortcut", "clean"):
        command = recipe.replace("shortcut", name).replace("${CYCLEX_HOME:-~/.cache/cyclex}", str(home))
        command = command.replace("runs/demo/phantoms", str(demo_out / "phantoms"))
        command = command.replace(f"runs/{name}-again", str(tmp_path / f"{name}-again"))
        args = shlex.split(command)
        assert args[:2] == ["cyclex", "explain"]
        result = CliRunner().invoke(app, [*args[1:], "--steps", STEPS])
        assert result.exit_code == 0, result.output
        again, original = tmp_path / f"{name}-again", demo_out / name
        assert _verdicts(again) == _verdicts(original) and _verdicts(original)
        assert shortcut_marker_overlap(again) == shortcut_marker_overlap(original)
        line = json.loads((again / "results.jsonl").read_text().splitlines()[0])
        assert line["chest_box"] is None and len(line["alignment_chest_box"]) == 4  # maps unmasked, box kept


@pytest.mark.parametrize("stored", ["chest_box", "alignment_chest_box"])
def test_query_folder_keeps_the_box_for_evaluation_only(tmp_path, stored):
    from cyclex.datasets.phantom import read_phantom_folder, write_phantom_folder
    from cyclex.demo.queries import demo_query_phantoms, write_query_folder

    phantoms = demo_query_phantoms(2)
    writer = write_query_folder if stored == "alignment_chest_box" else write_phantom_folder
    records = read_phantom_folder(writer(phantoms, tmp_path / "q"))
    assert [r[stored] for r in records] == [list(p.chest_box) for p in phantoms]
    other = "chest_box" if stored == "alignment_chest_box" else "alignment_chest_box"
    assert all(other not in r for r in records)
