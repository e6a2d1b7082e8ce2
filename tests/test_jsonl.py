"""cyclex.jsonl: the one JSON cleaner (what run_folder, evaluate_run and the search logs wrote before)
and read_jsonl's errors and torn-line skipping."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cyclex.jsonl import read_jsonl, to_json_safe


def test_run_folder_values_keep_their_bytes():
    # run_folder.py's records and run_config.json: numpy scalars, paths, tuples, non-str keys
    line = {"chest_box": (1, 2, 60, 61), "files": {"query": Path("items/a/query.png")},
            "frame": {"threshold": np.float32(0.25), "area": np.int64(12), "on": np.bool_(True)},
            "settings": {"map_blur": 5, "findings": None, 3: "three"}, "report": "ok"}
    assert json.dumps(to_json_safe(line), sort_keys=True) == (
        '{"chest_box": [1, 2, 60, 61], "files": {"query": "items/a/query.png"}, '
        '"frame": {"area": 12, "on": true, "threshold": 0.25}, "report": "ok", '
        '"settings": {"3": "three", "findings": null, "map_blur": 5}}')


def test_evaluate_run_values_keep_their_bytes():
    # evaluate_run.py's metrics rows and summary: numpy floats and ints, NaN / inf -> null
    row = {"image_id": "p0", "verified": True, "full/ncc": np.float64(0.5), "full/auc": np.float32(0.75),
           "lpips": float("nan"), "psnr": float("inf"), "top_k": [np.int32(1), np.int64(0)],
           "nested": {"curve": (np.float64("nan"), 1.0, -np.inf)}}
    assert json.dumps(to_json_safe(row)) == (
        '{"image_id": "p0", "verified": true, "full/ncc": 0.5, "full/auc": 0.75, "lpips": null, '
        '"psnr": null, "top_k": [1, 0], "nested": {"curve": [null, 1.0, null]}}')


@dataclass
class _Attempt:
    checkpoint: str
    strength: float
    grid: tuple


def test_search_log_values_keep_their_bytes():
    # search_maker.py's attempt logs: dataclasses, tuples, NaN scores
    record = {"attempts": [_Attempt("final", 0.8, (1, 2))], "score": float("nan"), "best": np.float64(0.1)}
    assert json.dumps(to_json_safe(record), sort_keys=True) == (
        '{"attempts": [{"checkpoint": "final", "grid": [1, 2], "strength": 0.8}], "best": 0.1, "score": null}')


def test_arrays_become_nested_lists_with_nan_as_null():
    assert to_json_safe(np.array([[0.5, np.nan], [1.0, 2.0]], np.float32)) == [[0.5, None], [1.0, 2.0]]
    assert to_json_safe(np.arange(3)) == [0, 1, 2]


def test_plain_values_pass_through_unchanged():
    for value in ("text", 3, True, None, 0.125):
        assert to_json_safe(value) == value and type(to_json_safe(value)) is type(value)


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:3: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"id": "a"}\n{"other": 1}\n')
    with pytest.raises(KeyError, match=r"rows.jsonl:2: missing keys \['id'\]"):
        read_jsonl(path, ("id",), error=KeyError)
    path.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_read_jsonl_can_skip_torn_lines(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b{"id": "c"}\n{"id": "d"}\n{"id": "e')
    with caplog.at_level(logging.WARNING, logger="cyclex.jsonl"):
        rows = read_jsonl(path, skip_unreadable=True)
    assert [r["id"] for r in rows] == ["a", "d"]
    assert "skipping unreadable line 2" in caplog.text and "skipping unreadable line 4" in caplog.text
