"""benchmarks/throughput.py: the batched and naive arms explain the same items (fake explainer, no model)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import throughput


class FakeExplainer:
    """explain() answers one result per requested (image, finding); it records every call's size."""

    def __init__(self, findings_per_image):
        self.findings_per_image = findings_per_image
        self.calls: list[tuple[int, object]] = []
        self.maker = self
        self.cleared = 0

    def clear_cache(self):
        self.cleared += 1

    def explain(self, images, findings=None):
        self.calls.append((images.shape[0], findings))
        if findings is None:
            return [f for i in range(images.shape[0]) for f in self.findings_per_image[i]]
        return list(findings)


def test_batched_is_one_call_and_naive_one_call_per_item():
    findings = [["Cardiomegaly", "Pleural Effusion"], [], ["Edema"]]
    explainer = FakeExplainer(findings)
    images = torch.zeros(3, 1, 8, 8)
    assert throughput.batched(explainer, images) == 3
    assert explainer.calls == [(3, None)]
    explainer.calls.clear()
    assert throughput.naive(explainer, images, findings) == 3
    assert explainer.calls == [(1, ["Cardiomegaly"]), (1, ["Pleural Effusion"]), (1, ["Edema"])]


def test_measure_reports_items_per_second_and_the_ratio_per_thread_count(monkeypatch):
    findings = [["Cardiomegaly"], ["Edema", "Pleural Effusion"]]
    explainer = FakeExplainer(findings)
    monkeypatch.setattr(throughput, "present_findings", lambda _explainer, _images: findings)
    threads_before = torch.get_num_threads()
    try:
        figures = throughput.measure(explainer, torch.zeros(2, 1, 8, 8), [1])
    finally:
        torch.set_num_threads(threads_before)
    assert figures["n_images"] == 2 and figures["n_counterfactuals"] == 3
    row = figures["by_threads"]["1"]
    for arm in ("batched", "naive"):
        assert row[arm]["counterfactuals_per_second"] == pytest.approx(3 / row[arm]["seconds"])
        assert row[arm]["images_per_second"] == pytest.approx(2 / row[arm]["seconds"])
    assert row["batched_vs_naive"] == pytest.approx(row["naive"]["seconds"] / row["batched"]["seconds"])
    assert explainer.cleared == 3  # before the warm-up and before each arm: no arm reuses another's inversions


def test_no_findings_is_an_error_not_an_empty_figure(monkeypatch):
    monkeypatch.setattr(throughput, "present_findings", lambda _explainer, _images: [[], []])
    with pytest.raises(RuntimeError, match="no finding"):
        throughput.measure(FakeExplainer([[], []]), torch.zeros(2, 1, 8, 8), [1])


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        throughput.main(["--images", "0"])
