"""Issue 18, defect 4: file names of any encoding work end to end (explain, report, generate)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from cycle_fakes import query, write_tiny_tailored
from PIL import Image
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.datasets.folder import read_image_folder
from cyclex.file_names import printable_text

LATIN1_NAME = os.fsdecode(b"caf\xe9-latin1.png")  # a Windows-1252 name on a UTF-8 system


def test_printable_text_escapes_only_what_utf8_cannot_hold():
    assert printable_text("ünïcode ü") == "ünïcode ü"
    assert printable_text(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert printable_text("a\ud800b") == "a\\ud800b"  # a lone surrogate no file name made
    for text in (printable_text(os.fsdecode(b"\xff\xfe")), printable_text("x\udcff")):
        text.encode("utf-8")  # never raises


@pytest.fixture
def folder(tmp_path):
    if os.fsencode(LATIN1_NAME) != b"caf\xe9-latin1.png":
        pytest.fail("this test needs a POSIX file system encoding with surrogateescape")
    folder = tmp_path / "in"
    folder.mkdir()
    image = np.uint8(query(0.9, 0.9)[0].numpy() * 255 + 0.5)
    for name in ("good.png", LATIN1_NAME, "ünïcode ü.png"):
        Image.fromarray(image).save(folder / name)
    return folder


def test_a_non_utf8_file_name_is_explained_and_reported(tmp_path, folder):
    records = read_image_folder(folder)
    assert {r.id for r in records} == {"good", "caf\\xe9-latin1", "ünïcode ü"}
    assert all(p.is_file() for r in records for p in r.image_paths)  # the path still opens the file
    out = tmp_path / os.fsdecode(b"run-\xe9")  # the run folder's own name is not UTF-8 either
    args = ["explain", "--generator", "python:cycle_fakes:brightness_reports",
            "--tailored", str(write_tiny_tailored(tmp_path / "sd")), "--images", str(folder), "--out", str(out),
            "--steps", "1", "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {line["image_id"] for line in lines} == {"good", "caf\\xe9-latin1", "ünïcode ü"}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "caf\\xe9-latin1" in page and "ünïcode ü" in page
    for line in lines:  # every item's files exist under sanitised names
        assert all((out / rel).is_file() for key, rel in line["files"].items() if key.endswith(("png", "query")))
    again = CliRunner().invoke(app, args)  # resumes: nothing redone, nothing lost
    assert again.exit_code == 0, again.output
    assert len((out / "results.jsonl").read_text(encoding="utf-8").splitlines()) == len(lines)
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output


def test_generate_keeps_every_report_for_non_utf8_names(tmp_path, folder):
    files = sorted(str(p) for p in folder.iterdir())
    out = tmp_path / os.fsdecode(b"reports-\xe9.csv")
    result = CliRunner().invoke(app, ["generate", "python:cycle_fakes:brightness_reports", *files, "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["image"] for row in rows) == files  # the file's own bytes, so the CSV reopens them
    assert all(row["report"] for row in rows)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name.startswith("tmp")]
