"""`cyclex train-tailored`: data set from the generator, training, selection, in one command."""

from __future__ import annotations

import json

from _tailored_helpers import save_tiny_base, write_images
from typer.testing import CliRunner

from cyclex.cli import app


def test_train_tailored_command_builds_trains_and_selects(tmp_path):
    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    write_images(tmp_path / "images", 10, size=32)
    out = tmp_path / "tailored"
    result = CliRunner().invoke(app, [
        "train-tailored", "--generator", "python:_tailored_helpers:disc_reports", "--images", str(tmp_path / "images"),
        "--base", str(base), "--out", str(out), "--max-steps", "2", "--resolution", "32", "--batch-size", "4",
        "--checkpointing-steps", "1", "--inversion-steps", "2",
    ])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "dataset" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert {r["prompt"] for r in rows} <= {"The lung with abnormalities Cardiomegaly", "The lung with no abnormalities"}
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection["metrics"]) == {"checkpoints/checkpoint-000001", "checkpoints/checkpoint-000002"}
    assert json.loads((out / "cyclex_tailored.json").read_text())["generator"] == "python:_tailored_helpers:disc_reports"


def test_train_tailored_command_reports_a_broken_base(tmp_path):
    (tmp_path / "base" / "unet").mkdir(parents=True)
    write_images(tmp_path / "images", 2, size=16)
    result = CliRunner().invoke(app, [
        "train-tailored", "--generator", "python:_tailored_helpers:disc_reports", "--images", str(tmp_path / "images"),
        "--base", str(tmp_path / "base"), "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "is missing parts: unet/" in text and "vae/ (needs config.json)" in text
