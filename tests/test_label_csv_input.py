"""Hostile reports CSVs for `cyclex label` (issue 18, defect 8): each is read as written or refused by name."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.csv_text import CsvEncodingError, csv_bytes, read_csv_rows, spreadsheet_safe
from cyclex.labelers.registry import label_csv, read_report_column
from cyclex.labelers.report_text import strip_invisible_controls


def _labels(path) -> list[dict[str, str]]:
    return read_csv_rows(path)[1]


def test_a_one_megabyte_report_is_labelled(tmp_path):
    source = tmp_path / "big.csv"
    report = "word " * 220_000 + "Cardiomegaly."  # about 1.1 MB in one cell
    source.write_text(f'report\n"{report}"\nNo acute findings.\n', encoding="utf-8")
    labels = label_csv(source, tmp_path / "labels.csv")
    assert labels[0].states["Cardiomegaly"].value == "positive"
    assert csv.field_size_limit() == 131072  # the global limit is put back
    assert len(_labels(tmp_path / "labels.csv")[0]["report"]) == len(report)


def test_latin1_input_is_refused_naming_the_file_and_the_encoding_or_read_when_named(tmp_path):
    source = tmp_path / "latin.csv"
    source.write_bytes("report\nCardiomégalie. Cardiomegaly.\n".encode("latin-1"))
    with pytest.raises(CsvEncodingError, match=r"latin\.csv.*not utf-8 text.*0xe9.*line 2.*--encoding latin-1"):
        read_report_column(source, "report")
    result = CliRunner().invoke(app, ["label", str(source), "--out", str(tmp_path / "labels.csv")])
    assert result.exit_code == 2
    assert "latin.csv" in result.output and "not utf-8 text" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["label", str(source), "--encoding", "latin-1",
                                      "--out", str(tmp_path / "labels.csv")])
    assert result.exit_code == 0, result.output
    assert _labels(tmp_path / "labels.csv")[0]["report"] == "Cardiomégalie. Cardiomegaly."


def test_a_utf8_byte_order_mark_is_not_part_of_the_header(tmp_path):
    source = tmp_path / "bom.csv"
    source.write_text("report,id\nCardiomegaly.,7\n", encoding="utf-8-sig")
    assert read_report_column(source, "report") == ["Cardiomegaly."]
    header, _ = read_csv_rows(source)
    assert header == ["report", "id"]


def test_nan_and_none_are_words_not_missing_cells(tmp_path):
    source = tmp_path / "words.csv"
    source.write_text("report,other\nNaN,x\nNone,y\n,z\nshort\n", encoding="utf-8")
    assert read_report_column(source, "report") == ["NaN", "None", "", "short"]
    label_csv(source, tmp_path / "labels.csv")
    assert [row["report"] for row in _labels(tmp_path / "labels.csv")] == ["NaN", "None", "", "short"]


def test_bidi_and_zero_width_characters_cannot_hide_a_finding(tmp_path):
    source = tmp_path / "bidi.csv"
    hidden = "Cardio\u200bmegaly. \u202eNo\u202c acute \u2066effusion\u2069 is seen\u200f."
    source.write_text(f"report\n{hidden}\n", encoding="utf-8")
    labels = label_csv(source, tmp_path / "labels.csv")
    assert labels[0].states["Cardiomegaly"].value == "positive"
    written = _labels(tmp_path / "labels.csv")[0]["report"]
    assert written == "Cardiomegaly. No acute effusion is seen."
    assert strip_invisible_controls("a\x08b\tc\nd") == "a b\tc\nd"


@pytest.mark.parametrize("cell", ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"])
def test_formula_cells_are_written_escaped(tmp_path, cell):
    source = tmp_path / "hostile.csv"
    source.write_bytes(csv_bytes(["report"], [[cell]], text_columns=[]))
    label_csv(source, tmp_path / "labels.csv")
    rows = _labels(tmp_path / "labels.csv")
    assert rows[0]["report"] == "'" + strip_invisible_controls(cell)
    assert spreadsheet_safe(-1) == -1 and spreadsheet_safe("Cardiomegaly") == "Cardiomegaly"


def test_uncertain_codes_stay_minus_one(tmp_path):
    source = tmp_path / "uncertain.csv"
    source.write_text("report\nPossible cardiomegaly.\n", encoding="utf-8")
    label_csv(source, tmp_path / "labels.csv")
    assert _labels(tmp_path / "labels.csv")[0]["Cardiomegaly"] == "-1"


def test_generate_writes_formula_reports_escaped(tmp_path):
    from PIL import Image

    image = tmp_path / "=cmd.png"
    Image.new("L", (32, 32), 128).save(image)
    out = tmp_path / "reports.csv"
    result = CliRunner().invoke(app, ["generate", "python:tests.test_label_csv_input:formula_generator", str(image),
                                      "--out", str(out), "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    rows = _labels(out)
    assert rows[0]["report"] == "'=1+1 cardiomegaly"
    assert rows[0]["image"].startswith("'") is False  # a path starts with the folder, not with '='


def formula_generator(images):
    """A generator spec for the test above: a report that is a spreadsheet formula."""
    return ["=1+1 cardiomegaly" for _ in range(len(images))]
