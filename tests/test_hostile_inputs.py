"""Issue 18: defects the hostile-input corpus found, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cyclex.datasets.images import ImageReadError, read_image


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_header_is_an_image_read_error(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_declaring(200_000, 200_000))
    with pytest.raises(ImageReadError, match="bomb.png: declares too many pixels"):
        read_image(tmp_path / "bomb.png")


def test_broken_symlinks_named_like_images_are_listed_not_dropped(tmp_path):
    from cyclex.datasets.folder import read_image_folder
    from cyclex.tailored_training.dataset import read_image_source

    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop.png")
    assert {r.id for r in read_image_folder(tmp_path)} == {"good", "dangling", "loop", "loop2"}
    assert {r.id for r in read_image_source(tmp_path)} == {"good", "dangling", "loop", "loop2"}
    with pytest.raises(ImageReadError, match="loop.png: cannot access"):
        read_image(tmp_path / "loop.png")


def test_duplicate_ids_in_a_csv_name_the_csv_and_rows(tmp_path):
    from cyclex.datasets.folder import read_image_folder

    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "index.csv").write_text("image,id\na.png,x\na.png,x\n")
    with pytest.raises(ValueError, match=r"index.csv: rows 2 and 3 have the same image id 'x'"):
        read_image_folder(tmp_path, tmp_path / "index.csv")


def test_a_row_longer_than_the_header_is_an_error_not_a_dropped_tail(tmp_path):
    from cyclex.csv_text import read_csv_rows

    (tmp_path / "r.csv").write_text("id,report\n1,No cardiomegaly, effusion present\n")
    with pytest.raises(ValueError, match=r"r.csv' line 2: 3 cells but the header names 2 columns; quote"):
        read_csv_rows(tmp_path / "r.csv")
    (tmp_path / "ok.csv").write_text('id,report\n1,"No cardiomegaly, effusion present"\n2\n')
    assert read_csv_rows(tmp_path / "ok.csv")[1] == [{"id": "1", "report": "No cardiomegaly, effusion present"},
                                                    {"id": "2", "report": ""}]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_guidance_must_be_finite(value):
    from cyclex.cycle.settings import ExplainSettings, SearchGrid

    with pytest.raises(ValueError, match="guidance must be a finite number"):
        ExplainSettings(guidance=value)
    with pytest.raises(ValueError, match="guidances must be finite"):
        SearchGrid(guidances=(7.0, value))


def test_training_images_go_through_the_one_reader(tmp_path):
    from cyclex.tailored_training.dataset import load_gray_image

    Image.fromarray(np.full((4, 4), 100, np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="tiny.png: the image is 4 x 4 pixels"):
        load_gray_image(tmp_path / "tiny.png", 32)
    image = np.full((32, 32), 0.5, np.float32)
    image[3, 3] = np.nan
    Image.fromarray(image, mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(ValueError, match="nan.tiff: decoded image contains NaN"):
        load_gray_image(tmp_path / "nan.tiff", 32)
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "ok.png")
    assert load_gray_image(tmp_path / "ok.png", 32).shape == (32, 32)
    with pytest.raises(FileNotFoundError, match="no image files"):
        from cyclex.tailored_training.dataset import read_image_source

        (tmp_path / "empty").mkdir()
        read_image_source(tmp_path / "empty")


def test_generate_refuses_a_tiny_image(tmp_path):
    from typer.testing import CliRunner

    from cyclex.cli import app

    Image.fromarray(np.full((2, 2), 100, np.uint8)).save(tmp_path / "two.png")
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(tmp_path / "good.png")
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(app, ["generate", "python:benchmarks.hostile_generators:heart_reports",
                                      str(tmp_path / "good.png"), str(tmp_path / "two.png"), "--out", str(out)])
    assert result.exit_code == 1 and "two.png: the image is 2 x 2 pixels" in " ".join(result.output.split())
    assert "two.png" not in out.read_text() and "good.png" in out.read_text()


def test_unreadable_json_inputs_name_their_file(tmp_path):
    from cyclex.jsonl import read_jsonl
    from cyclex.specs.scorers import load_thresholds_spec

    (tmp_path / "results.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(ValueError, match="results.jsonl: not UTF-8 text"):
        read_jsonl(tmp_path / "results.jsonl")
    (tmp_path / "t.json").write_text("{")
    with pytest.raises(ValueError, match="t.json: not a JSON file"):
        load_thresholds_spec(tmp_path / "t.json", demo=False)
    (tmp_path / "t.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="t.json: expected a JSON object"):
        load_thresholds_spec(tmp_path / "t.json", demo=False)


def test_a_garbage_annotation_csv_names_the_file(tmp_path):
    from cyclex.explain.annotations import _read_csv

    (tmp_path / "boxes.csv").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(ValueError, match="annotation CSV .*boxes.csv: not UTF-8 text"):
        _read_csv(tmp_path / "boxes.csv")
