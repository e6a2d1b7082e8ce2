"""`cyclex explain --num-processes 2` runs `accelerate launch -m cyclex explain` (2 gloo CPU processes)
with the demo's tiny SD and generator, and makes the run folder one process makes."""

from __future__ import annotations

import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cyclex.cli import app, command_line_of

# Per-batch bookkeeping of the DDIM maker: how big the batch was and how long it took, not the item
BATCH_BOOKKEEPING = ("seconds", "seconds_batch", "batch_size", "unet_calls", "unet_calls_batch", "start_index")


def _comparable(line: dict) -> dict:
    details = {k: v for k, v in line["maker_details"].items() if k not in BATCH_BOOKKEEPING}
    return {**{k: v for k, v in line.items() if k not in ("timings", "maker_details")}, "maker_details": details}


@pytest.fixture()
def demo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path / "home"


def test_num_processes_2_makes_the_single_process_run(tmp_path, demo_home):
    from cyclex.demo.queries import demo_query_phantoms

    images = tmp_path / "in"
    images.mkdir()
    for number, phantom in enumerate(demo_query_phantoms(3)):
        Image.fromarray((phantom.image * 255).astype("uint8")).save(images / f"q{number}.png")
    common = ["explain", "--generator", "demo:shortcut", "--tailored", "demo:shortcut", "--images", str(images),
              "--steps", "3", "--guidance", "1", "--checkpoint", "final", "--batch-size", "2"]
    single = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    two = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "two"), "--num-processes", "2"])
    assert two.exit_code == 0, two.output
    one_lines = [json.loads(x) for x in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    two_lines = [json.loads(x) for x in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    assert one_lines and [_comparable(x) for x in two_lines] == [_comparable(x) for x in one_lines]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"]["num_processes"] == 2
    assert (tmp_path / "two" / "index.html").is_file()  # rank 0 wrote the report page


def test_command_line_of_repeats_the_options_given():
    seen = {}
    probe = typer.Typer()

    @probe.command()
    def run(ctx: typer.Context, out: str = typer.Option(..., "--out"), names: list[str] = typer.Option(None, "--name"),
            flag: bool = typer.Option(True, "--flag/--no-flag"), steps: int = typer.Option(50, "--steps"),
            num_processes: int = typer.Option(1, "--num-processes")):
        seen["args"] = command_line_of(ctx, drop=("num_processes",))

    result = CliRunner().invoke(probe, ["--out", "R", "--name", "a", "--name", "b c", "--no-flag",
                                        "--num-processes", "4"])
    assert result.exit_code == 0, result.output
    # defaults (--steps) are left out, so the launched processes see exactly what the user typed
    assert seen["args"] == ["run", "--out", "R", "--name", "a", "--name", "b c", "--no-flag"]
