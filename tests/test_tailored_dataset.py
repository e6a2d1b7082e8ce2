"""build_tailored_dataset: prompts from generated reports, resumable cache, failing images skipped, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from _tailored_helpers import write_images

from cyclex.adapters.base import GeneratorInfo
from cyclex.findings import FindingLabels, LabelState
from cyclex.tailored_training import EmptyDatasetError, build_tailored_dataset, read_manifest
from cyclex.tailored_training.dataset import TooManyFailuresError


class KeywordLabeler:
    """Cardiomegaly positive when the report says 'enlarged heart', uncertain when 'possible'."""

    def label(self, reports):
        out = []
        for text in reports:
            state = LabelState.BLANK
            if "enlarged heart" in text:
                state = LabelState.UNCERTAIN if "possible" in text else LabelState.POSITIVE
            out.append(FindingLabels({"Cardiomegaly": state}))
        return out


class BrightnessGenerator:
    """Reports an enlarged heart for bright images; fails on any batch holding an image brighter than `fail_above`."""

    def __init__(self, fail_above: float = 2.0, crash_after_batches: int | None = None):
        self.info = GeneratorInfo(name="fake:brightness")
        self.fail_above, self.crash_after = fail_above, crash_after_batches
        self.images_seen = 0
        self.batches = 0

    def generate(self, images: torch.Tensor) -> list[str]:
        self.batches += 1
        if self.crash_after is not None and self.batches > self.crash_after:
            raise KeyboardInterrupt  # a crash the run must not swallow
        means = images.flatten(1).mean(1)
        if (means > self.fail_above).any():
            raise RuntimeError("model exploded")
        self.images_seen += len(images)
        return ["possible enlarged heart." if m > 0.5 else ("enlarged heart." if m > 0.35 else "normal.") for m in means]


def _records(tmp_path, n=10):
    paths = write_images(tmp_path / "images", n, size=16)
    return [{"id": p.stem, "image": str(p), "report": "enlarged heart." if i % 2 else "normal."}
            for i, p in enumerate(paths)]


def _mean(path):
    from cyclex.tailored_training.dataset import load_gray_image

    return float(load_gray_image(path).mean())


def test_manifest_uses_generated_reports_and_keeps_ground_truth(tmp_path):
    records = _records(tmp_path)
    manifest = build_tailored_dataset(BrightnessGenerator(), records, KeywordLabeler(), tmp_path / "ds", batch_size=4,
                                      show_progress=False)
    rows = read_manifest(manifest)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records, strict=True):
        mean = _mean(record["image"])
        expected = "The lung with abnormalities Cardiomegaly" if mean > 0.35 else "The lung with no abnormalities"
        assert row["prompt"] == row["generated_prompt"] == expected
        assert row["ground_truth_report"] == record["report"]
        gt_expected = "The lung with abnormalities Cardiomegaly" if "enlarged" in record["report"] else \
            "The lung with no abnormalities"
        assert row["ground_truth_prompt"] == gt_expected
    counts = json.loads((tmp_path / "ds" / "counts.json").read_text())
    n_cardio = sum(r["prompt"].endswith("Cardiomegaly") for r in rows)
    assert counts["present"]["Cardiomegaly"] == n_cardio and counts["n_images"] == 10
    assert counts["n_without_abnormality"] == 10 - n_cardio


def test_ground_truth_prompt_source_and_uncertain_choice(tmp_path):
    records = _records(tmp_path)
    manifest = build_tailored_dataset(BrightnessGenerator(), records, KeywordLabeler(), tmp_path / "gt",
                                      prompt_source="ground-truth", show_progress=False)
    rows = read_manifest(manifest)
    assert all(r["prompt"] == r["ground_truth_prompt"] for r in rows)
    strict = read_manifest(build_tailored_dataset(BrightnessGenerator(), records, KeywordLabeler(), tmp_path / "strict",
                                                  uncertain_as_present=False, template="prism", show_progress=False))
    for row, record in zip(strict, records, strict=True):
        positive = 0.35 < _mean(record["image"]) <= 0.5  # "possible" (uncertain) no longer counts
        assert row["prompt"] == ("Chest X-ray showing Cardiomegaly" if positive else
                                 "Normal chest X-ray with no significant findings")


def test_failing_images_are_skipped_and_recorded(tmp_path):
    records = _records(tmp_path, n=8)
    means = {r["id"]: _mean(r["image"]) for r in records}
    ordered = sorted(means.values())
    threshold = (ordered[-3] + ordered[-2]) / 2  # the 2 brightest images make the generator fail
    gen = BrightnessGenerator(fail_above=threshold)
    rows = read_manifest(build_tailored_dataset(gen, records, KeywordLabeler(), tmp_path / "ds", batch_size=4,
                                                show_progress=False, max_failed_fraction=0.3))
    bad = {i for i, m in means.items() if m > threshold}
    assert len(bad) == 2
    assert {r["id"] for r in rows} == set(means) - bad
    failures = [json.loads(line) for line in (tmp_path / "ds" / "failures.jsonl").read_text().splitlines()]
    assert {f["id"] for f in failures} == bad and all("model exploded" in f["error"] for f in failures)


def test_a_tenth_of_the_images_failing_is_refused_loudly_and_counted(tmp_path, caplog):
    # the user's run: 11 % of the images failed (IndexError mid-batch) and training went on without
    # them, with one warning among hundreds of lines
    records = _records(tmp_path, n=9)
    ordered = sorted(_mean(r["image"]) for r in records)
    assert ordered[-1] > ordered[-2]
    brightest = (ordered[-1] + ordered[-2]) / 2
    gen = BrightnessGenerator(fail_above=brightest)  # fails on the brightest of 9 images
    with pytest.raises(TooManyFailuresError) as refused:
        build_tailored_dataset(gen, records, KeywordLabeler(), tmp_path / "ds", batch_size=4, show_progress=False)
    message = str(refused.value)
    assert "1 of 9 images (11.1 %) failed: 1 x " in message and "model exploded" in message
    assert "--max-failed-fraction" in message and "failures.jsonl" in message
    assert not (tmp_path / "ds" / "manifest.jsonl").exists()  # nothing to train on was written
    assert len((tmp_path / "ds" / "failures.jsonl").read_text().splitlines()) == 1
    # allowed explicitly: the manifest is built, the skipped images counted in dataset.json, one summary warning
    with caplog.at_level("WARNING", logger="cyclex.tailored_training.dataset"):
        rows = read_manifest(build_tailored_dataset(BrightnessGenerator(fail_above=brightest), records,
                                                    KeywordLabeler(), tmp_path / "ds", batch_size=4,
                                                    show_progress=False, max_failed_fraction=0.2))
    assert len(rows) == 8
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["n_failed"] == 1
    assert any("without 1 of 9 images (11.1 %) failed" in r.getMessage() for r in caplog.records)


def test_resume_after_crash_reuses_finished_batches(tmp_path):
    records = _records(tmp_path, n=10)
    crashing = BrightnessGenerator(crash_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        build_tailored_dataset(crashing, records, KeywordLabeler(), tmp_path / "ds", batch_size=3, show_progress=False)
    cached = (tmp_path / "ds" / "generated_reports.jsonl").read_text().splitlines()
    assert len(cached) == 6  # two finished batches survive the crash
    (tmp_path / "ds" / "generated_reports.jsonl").write_text("\n".join(cached) + '\n{"id": "img00')  # torn last write
    again = BrightnessGenerator()
    rows = read_manifest(build_tailored_dataset(again, records, KeywordLabeler(), tmp_path / "ds", batch_size=3,
                                                show_progress=False))
    assert again.images_seen == 4 and len(rows) == 10


def test_empty_and_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(EmptyDatasetError, match="no images"):
        build_tailored_dataset(BrightnessGenerator(), [], KeywordLabeler(), tmp_path / "a")
    records = _records(tmp_path, n=3)
    with pytest.raises(EmptyDatasetError, match="no report for any"):
        build_tailored_dataset(BrightnessGenerator(fail_above=-1), records, KeywordLabeler(), tmp_path / "b",
                               show_progress=False)
    with pytest.raises(ValueError, match="prompt_source"):
        build_tailored_dataset(BrightnessGenerator(), records, KeywordLabeler(), tmp_path / "c", prompt_source="gt")
    no_report = [{"id": "x", "image": records[0]["image"]}]
    with pytest.raises(ValueError, match="needs a ground-truth report"):
        build_tailored_dataset(BrightnessGenerator(), no_report, KeywordLabeler(), tmp_path / "d",
                               prompt_source="ground-truth")
    with pytest.raises(ValueError, match="duplicate image id"):
        build_tailored_dataset(BrightnessGenerator(), records + records[:1], KeywordLabeler(), tmp_path / "e")
