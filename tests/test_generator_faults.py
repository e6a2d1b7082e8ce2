"""Generator faults in `explain` (issue 18, defect 5): each fails only its images, logged, retried on rerun."""

from __future__ import annotations

import json
import re
import sys
import threading
import time

import numpy as np
import pytest
import torch
from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_reports, query, write_tiny_tailored
from PIL import Image
from typer.testing import CliRunner

from cyclex.adapters import CallableGenerator, GeneratorError, GeneratorInfo
from cyclex.adapters.guarded import EmptyReportError, GeneratorTimeout, GuardedGenerator
from cyclex.cli import app
from cyclex.cycle import CyclicExplainer
from cyclex.cycle import run_folder as rf
from cyclex.cycle.generator_faults import read_skipped

# "p" is the poisoned image: its background is bright, which the faulty generators below react to
QUERIES = {"a": (0.9, 0.9, 0.2), "p": (0.9, 0.1, 0.7), "b": (0.9, 0.1, 0.2), "n": (0.1, 0.1, 0.2)}
HANG = threading.Event()  # set: the hanging generator answers


def _records(folder):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, (heart, effusion, background) in QUERIES.items():
        path = folder / f"{image_id}.png"
        Image.fromarray(np.uint8(query(heart, effusion, 0.1, background)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": image_id, "image": str(path), "chest_box": [0, 0, 32, 32]})
    return records


def _poisoned(images: torch.Tensor) -> list[bool]:
    return [bool(image[0, 0, 0] > 0.5) for image in images]


def _faulty(kind: str):
    """A generator answering like the brightness one except on batches holding the poisoned image."""

    def generate(images):
        reports = brightness_reports(images)
        if not any(_poisoned(images)):
            return reports
        if kind == "raise":
            raise ValueError("CUDA error: device-side assert triggered")
        if kind == "exit":
            sys.exit(3)
        if kind == "none":
            return None
        if kind == "count":
            return reports[:-1]
        if kind == "non-string":
            return [None if bad else r for r, bad in zip(reports, _poisoned(images), strict=True)]
        if kind == "empty":
            return ["" if bad else r for r, bad in zip(reports, _poisoned(images), strict=True)]
        raise AssertionError(kind)

    return generate


class RawGenerator:
    """A user's ReportGenerator object (no adapter around it): its exceptions reach cyclex as they are."""

    info = GeneratorInfo(name="python:user:RawGenerator", channels=1)

    def generate(self, images):
        if any(_poisoned(images)):
            raise KeyError("vocab")
        return brightness_reports(images)


def _explainer(generator):
    return CyclicExplainer(generator, KeywordLabeler(), PaintingMaker(), frame_threshold=95)


def _lines(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _complete(out, image_id):
    return (out / "records" / rf.safe_name(image_id) / "_complete.json").is_file()


@pytest.mark.parametrize(("kind", "message"), [
    ("raise", "raised ValueError.*device-side assert"),
    ("exit", r"sys\.exit\(3\)"),
    ("none", "returned NoneType, expected a list of strings"),
    ("count", "returned 0 reports for 1 images"),
    ("non-string", "non-string reports at positions"),
    ("empty", "empty report"),
])
def test_a_faulty_batch_fails_only_its_bad_image_which_a_rerun_redoes(tmp_path, kind, message):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    summary = rf.run_explainer(_explainer(CallableGenerator(_faulty(kind), GeneratorInfo(name="fake:faulty"))),
                               records, out, batch_size=3, progress=False)
    # the batch (a, p, b) failed, was explained image by image: only p is an error
    skipped = read_skipped(out)
    assert [(line["id"], line["stage"]) for line in skipped] == [("p", "generator")]
    assert skipped[0]["image"].endswith("p.png")
    assert re.search(message, skipped[0]["error"]), skipped[0]["error"]
    assert not _complete(out, "p") and all(_complete(out, i) for i in "abn")
    assert [x["image_id"] for x in _lines(out)] == ["a", "a", "b"]
    assert summary["n_images_failed"] == 1 and summary["n_images_done"] == 3
    # the generator is fixed (same name, same settings): the rerun redoes p only and clears the list
    maker = PaintingMaker()
    fixed = CallableGenerator(brightness_reports, GeneratorInfo(name="fake:faulty"))
    summary = rf.run_explainer(CyclicExplainer(fixed, KeywordLabeler(), maker, frame_threshold=95), records, out,
                               batch_size=3, progress=False)
    assert maker.requests == 1 and _complete(out, "p")
    assert [x["image_id"] for x in _lines(out)] == ["a", "a", "p", "b"]
    assert summary["n_images_failed"] == 0 and not (out / "skipped.jsonl").exists()


def test_a_raw_generator_objects_exception_is_a_generator_error(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    rf.run_explainer(_explainer(RawGenerator()), records, out, batch_size=1, progress=False)
    assert [(line["id"], line["error_type"]) for line in read_skipped(out)] == [("p", "GeneratorError")]
    assert "RawGenerator raised KeyError" in read_skipped(out)[0]["error"]
    with pytest.raises(GeneratorError, match="called sys.exit"):
        GuardedGenerator(CallableGenerator(_faulty("exit"))).generate(torch.full((1, 1, 32, 32), 0.9))


def test_only_empty_reports_no_longer_pass_for_done_images(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    summary = rf.run_explainer(_explainer(CallableGenerator(lambda images: [""] * len(images))), records, out,
                               batch_size=2, progress=False)
    assert summary["n_images_done"] == 0 and summary["n_images_failed"] == 4
    assert {line["error_type"] for line in read_skipped(out)} == {"EmptyReportError"}
    with pytest.raises(EmptyReportError, match="positions \\[1\\]"):
        GuardedGenerator(CallableGenerator(lambda images: ["ok", "  \n"])).generate(torch.zeros(2, 1, 8, 8))


def _slow_on_poison(images):
    if any(_poisoned(images)):
        time.sleep(0.8)
    return brightness_reports(images)


def _hangs_on_poison(images):
    if any(_poisoned(images)):
        HANG.wait(60)
    return brightness_reports(images)


def test_a_slow_call_times_out_and_the_run_goes_on(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    started = time.monotonic()
    summary = rf.run_explainer(_explainer(CallableGenerator(_slow_on_poison)), records, out, batch_size=1,
                               progress=False, generator_timeout_s=0.5)
    # p timed out; the next call waited for the slow one to end (no two calls at once), then ran
    assert [line["id"] for line in read_skipped(out)] == ["p"]
    assert "did not answer within 0.5 s" in read_skipped(out)[0]["error"]
    assert summary["n_images_done"] == 3
    assert time.monotonic() - started < 20


def test_a_hanging_generator_never_hangs_cyclex(tmp_path):
    records = _records(tmp_path / "in")
    out = tmp_path / "run"
    HANG.clear()
    started = time.monotonic()
    try:
        rf.run_explainer(_explainer(CallableGenerator(_hangs_on_poison)), records, out, batch_size=2,
                         progress=False, generator_timeout_s=0.3)
    finally:
        HANG.set()  # let the worker thread end
    elapsed = time.monotonic() - started
    errors = {line["id"]: line["error"] for line in read_skipped(out)}
    # batch (a, p) timed out (not retried one by one: it would hang again); batch (b, n) found the
    # generator still busy and was refused rather than calling the model a second time at once
    assert sorted(errors) == ["a", "b", "n", "p"]
    assert "did not answer within 0.3 s" in errors["p"] and "still busy" in errors["b"]
    assert elapsed < 15
    with pytest.raises(ValueError, match="positive number of seconds"):
        GuardedGenerator(CallableGenerator(brightness_reports), timeout_s=0)
    assert issubclass(GeneratorTimeout, GeneratorError)


def test_guard_keeps_the_callers_grad_mode_in_its_worker_thread():
    seen = []

    def generate(images):
        seen.append(torch.is_grad_enabled())
        return ["x"] * len(images)

    with torch.no_grad():
        GuardedGenerator(CallableGenerator(generate), timeout_s=5).generate(torch.zeros(1, 1, 8, 8))
    assert seen == [False]


FIXED = {"on": False}


def empty_until_fixed(images):
    """python: spec of the CLI test: empty reports until the test 'fixes' it."""
    return brightness_reports(images) if FIXED["on"] else [""] * len(images)


def test_cli_explain_lists_failed_images_exits_1_and_a_rerun_redoes_them(tmp_path, monkeypatch):
    _records(tmp_path / "in")
    tailored = write_tiny_tailored(tmp_path / "sd")
    out = tmp_path / "run"
    args = ["explain", "--generator", "python:test_generator_faults:empty_until_fixed", "--tailored", str(tailored),
            "--images", str(tmp_path / "in"), "--out", str(out), "--steps", "2", "--labeler",
            "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly", "--batch-size", "4",
            "--generator-timeout", "120"]
    monkeypatch.setitem(FIXED, "on", False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "the generator failed on 4 of 4 images" in result.output and "skipped.jsonl" in result.output
    assert "empty report" in result.output and "Traceback" not in result.output
    monkeypatch.setitem(FIXED, "on", True)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [x["image_id"] for x in _lines(out)] == ["a", "b", "p"]  # a folder's images in name order
    assert not (out / "skipped.jsonl").exists()
