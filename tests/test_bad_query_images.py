"""Issue 18, defects 4 and 7: one bad query image is skipped and listed, never ends an explain run."""

from __future__ import annotations

import json

import numpy as np
from cycle_fakes import query, write_tiny_tailored
from PIL import Image
from typer.testing import CliRunner

from cyclex.cli import app


def _folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.uint8(query(0.9, 0.9)[0].numpy() * 255 + 0.5)).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all\n")
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(folder / "tiny.png")
    truncated = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(truncated[: len(truncated) // 3])
    (folder / "link.png").symlink_to(folder / "text.png")
    return folder


def test_bad_images_are_skipped_listed_and_retried(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "run"
    args = ["explain", "--generator", "python:cycle_fakes:brightness_reports",
            "--tailored", str(write_tiny_tailored(tmp_path / "sd")), "--images", str(folder), "--out", str(out),
            "--steps", "1", "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    lines = {json.loads(x)["id"]: json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()}
    bad = {"empty", "text", "tiny", "truncated", "link"}
    found = {i for i in lines if i in bad or any(i.startswith(b) for b in bad)}
    assert len(found) == len(bad) and all(line["stage"] == "image" for line in lines.values())
    assert "1 x 1 pixels" in " ".join(line["error"] for line in lines.values())
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["image_id"] for r in results} == {"good"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images_skipped"] == len(bad) and summary["n_images_done"] == 1
    assert "skipped 5 of 6 images" in " ".join(result.output.split())
    # fixed on disk: the rerun explains it and drops its line; the finished image is not redone
    Image.fromarray(np.uint8(query(0.8, 0.9)[0].numpy() * 255 + 0.5)).save(folder / "tiny.png")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    lines = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert "tiny" not in {line["id"] for line in lines} and len(lines) == len(bad) - 1
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["image_id"] for r in results} == {"good", "tiny"}


def test_a_run_folder_inside_the_images_is_not_explained(tmp_path):
    from cyclex.cycle.run_ownership import MARKER_NAME
    from cyclex.datasets.folder import CYCLEX_RUN_MARKER, read_image_folder

    assert CYCLEX_RUN_MARKER == MARKER_NAME
    folder = tmp_path / "in"
    (folder / "run" / "items" / "a").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(folder / "run" / "items" / "a" / "query.png")
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(folder / "run" / "other.png")
    assert {r.id for r in read_image_folder(folder)} == {"a", "run/items/a/query", "run/other"}
    (folder / "run" / MARKER_NAME).write_text("{}")
    assert {r.id for r in read_image_folder(folder)} == {"a"}
