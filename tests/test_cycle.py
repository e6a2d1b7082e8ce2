"""The cyclic engine with generators whose answers are known (pixel brightness) and a painting maker."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cycle_fakes import EDEMA, EFFUSION, HEART, KeywordLabeler, PaintingMaker, brightness_generator, query

from cyclex.counterfactuals.ddim import DDIMCounterfactualMaker
from cyclex.cycle import CyclicExplainer, cyclic_rate
from cyclex.demo.tiny_sd import tiny_sd_pipeline
from cyclex.findings import StructuredPrompt


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


class CountingGenerator:
    def __init__(self):
        self.inner = brightness_generator()
        self.info = self.inner.info
        self.calls = 0

    def generate(self, images):
        self.calls += 1
        return self.inner.generate(images)


def _explainer(maker, **kwargs):
    return CyclicExplainer(CountingGenerator(), KeywordLabeler(), maker, frame_threshold=95, **kwargs)


def test_verified_and_not_verified_in_one_batch():
    maker = PaintingMaker(ineffective={"Pleural Effusion"})
    explainer = _explainer(maker)
    images = torch.stack([query(heart=0.9, effusion=0.9), query(heart=0.9), query(heart=0.1)])
    results = explainer.explain(images, image_ids=["a", "b", "c"])
    # a: Cardiomegaly + Pleural Effusion, b: Cardiomegaly, c: nothing to remove
    assert [(r.image_id, r.finding) for r in results] == [
        ("a", "Cardiomegaly"), ("a", "Pleural Effusion"), ("b", "Cardiomegaly")]
    assert [r.verified for r in results] == [True, False, True]
    assert maker.calls == 1 and maker.requests == 3  # every counterfactual of the batch in one call
    assert explainer.generator.calls == 2  # queries once, counterfactuals once
    first = results[0]
    assert first.source_prompt == "The lung with abnormalities Cardiomegaly, Pleural Effusion"
    assert first.target_prompt == "The lung with abnormalities Pleural Effusion"
    assert first.report_before == "cardiomegaly, effusion" and first.report_after == "effusion"
    assert first.collateral_added == () and first.collateral_lost == ()
    # the frame is exactly the darkened heart box (difference 0.8 -> 204 > 95, blur keeps the edge)
    y0, y1, x0, x1 = HEART
    expected = np.zeros_like(first.frame.mask)
    expected[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(first.frame.mask, expected)
    # the positive map is smoothed by the frame's 5 x 5 Gaussian ([1, 4, 6, 4, 1] / 16 per axis): 0.8
    # two pixels inside the box, 0.8 * (11/16)^2 at its corner (by hand); raw with map_blur=1
    assert explainer.settings()["map_blur"] == 5
    assert first.positive[y0 + 2:y1 - 2, x0 + 2:x1 - 2].min() == pytest.approx(0.8)
    assert first.positive[y0, x0] == pytest.approx(0.8 * (11 / 16) ** 2)
    raw = _explainer(PaintingMaker(), map_blur=1).explain(images[:1], findings=["Cardiomegaly"])[0]
    assert raw.positive[y0:y1, x0:x1].min() == pytest.approx(0.8) and raw.positive.sum() == pytest.approx(0.8 * 144)
    with pytest.raises(ValueError, match="map_blur"):
        _explainer(PaintingMaker(), map_blur=2)
    assert first.difference.min() >= 0  # painting only darkens here
    rate = cyclic_rate(results)
    assert rate["cyclic_rate"] == pytest.approx(2 / 3) and rate["n"] == 3
    assert rate["per_finding"]["Cardiomegaly"] == {"cyclic_rate": 1.0, "n": 2, "n_verified": 2}
    assert rate["per_finding"]["Pleural Effusion"]["cyclic_rate"] == 0.0
    json.dumps(first.to_record())  # serialisable


def test_collateral_added_and_lost():
    # removing Cardiomegaly also lights up the edema box and darkens the effusion box
    maker = PaintingMaker(effects={"Cardiomegaly": [(EDEMA, 0.9), (EFFUSION, 0.0)]})
    result = _explainer(maker).explain(query(heart=0.9, effusion=0.9)[None], findings=["Cardiomegaly"])
    assert len(result) == 1
    r = result[0]
    assert r.verified and r.collateral_added == ("Edema",) and r.collateral_lost == ("Pleural Effusion",)
    assert r.labels_after.present() == ("Edema",)
    # the largest frame component is the heart box, then edema (lighter in CF: negative I - CF) and effusion
    assert [c.area for c in r.frame.components] == [144, 36, 36]
    assert r.positive[EDEMA[0]:EDEMA[1], EDEMA[2]:EDEMA[3]].max() == 0.0


def test_uncertain_counts_as_present_only_when_asked():
    # heart painted to 0.45 -> "possible cardiomegaly" (uncertain) after removal
    images = query(heart=0.9)[None]
    strict = _explainer(PaintingMaker(heart_value=0.45), uncertain_as_present=True).explain(images)
    lenient = _explainer(PaintingMaker(heart_value=0.45), uncertain_as_present=False).explain(images)
    assert strict[0].report_after == "possible cardiomegaly"
    assert strict[0].verified is False and lenient[0].verified is True
    # an uncertain finding in the query is removable only when uncertain counts as present
    unsure = query(heart=0.45)[None]
    assert [r.finding for r in _explainer(PaintingMaker(), uncertain_as_present=True).explain(unsure)] == ["Cardiomegaly"]
    assert _explainer(PaintingMaker(), uncertain_as_present=False).explain(unsure) == []


def test_named_findings_prism_template_and_chest_boxes():
    maker = PaintingMaker()
    explainer = _explainer(maker, template="prism")
    images = torch.stack([query(heart=0.9, effusion=0.9, edema=0.9), query(heart=0.9)])
    results = explainer.explain(images, findings=["effusion", "Edema"], chest_boxes=[(0, 0, 16, 32), None])
    assert [(r.image_index, r.finding) for r in results] == [(0, "Edema"), (0, "Pleural Effusion")]
    assert results[0].source_prompt == StructuredPrompt(("Cardiomegaly", "Edema", "Pleural Effusion"), "prism").text
    # chest box x < 16 hides the edema box (x 24..30): no frame, zero maps
    assert results[0].chest_box == (0, 0, 16, 32) and results[0].frame.area == 0 and results[0].positive.max() == 0
    assert results[1].frame.area > 0
    with pytest.raises(ValueError, match="chest_boxes"):
        explainer.explain(images, chest_boxes=[None])


def test_cycle_with_the_ddim_maker_inverts_each_image_once(pipe):
    maker = DDIMCounterfactualMaker(pipe, num_inference_steps=4, guidance_scale=7.5)
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), maker, frame_threshold="stable")
    images = torch.stack([query(heart=0.9, effusion=0.9, edema=0.9), query(heart=0.9, effusion=0.9)])
    results = explainer.explain(images)
    assert len(results) == 5
    assert maker.inversions_run == 2  # 3 findings of image 0 and 2 of image 1 share 2 inversions
    assert maker.diffusion.unet_calls == 2 * 4 + 5 * 2 * 4
    for r in results:
        assert r.counterfactual.shape == (32, 32) and 0 <= r.counterfactual.min() and r.counterfactual.max() <= 1
        assert r.frame.threshold in (85.0, 90.0, 95.0, 100.0, 105.0)
        assert r.maker_details["variant"] == "ddim" and r.maker_details["steps"] == 4
    assert cyclic_rate(results)["n"] == 5


def test_from_pretrained_reads_the_tailored_metadata(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    (tmp_path / "cyclex_tailored.json").write_text(json.dumps({
        # queries are fitted to sample_size; the fake generator reads regions of 32-pixel images
        "vocabulary": [], "prompt_template": "prism", "sample_size": 32, "uncertain_as_present": False}))
    explainer = CyclicExplainer.from_pretrained(tmp_path, generator=brightness_generator(), labeler=KeywordLabeler(),
                                                num_inference_steps=3, guidance_scale=5.0)
    assert explainer.template == "prism" and explainer.uncertain_as_present is False
    assert explainer.image_size == 32 and explainer.resize == "pad"
    assert isinstance(explainer.maker, DDIMCounterfactualMaker)
    assert explainer.maker.settings()["guidance"] == 5.0
    assert explainer.maker.checkpoint_id.endswith("::best_psnr")
    results = explainer.explain(query(heart=0.9)[None])
    assert [r.finding for r in results] == ["Cardiomegaly"]


def test_default_settings_frame_a_faint_verified_removal():
    # the user's run: with the defaults, frame.area was 0 even for verified removals, because the
    # edit (here 0.62 -> 0.30, 82 of 255) stays below the absolute 85..105 thresholds
    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), PaintingMaker(heart_value=0.3))
    (result,) = explainer.explain(query(heart=0.62)[None])
    assert result.verified and result.finding == "Cardiomegaly"
    assert result.frame.area > 0
    x, y, w, h = result.frame.components[0].bbox
    y0, y1, x0, x1 = HEART
    assert abs(x - x0) <= 2 and abs(y - y0) <= 2 and abs(w - (x1 - x0)) <= 4 and abs(h - (y1 - y0)) <= 4
    from cyclex.cycle.settings import FrameSettings

    assert FrameSettings().normalize is True  # what `cyclex explain` uses by default


def test_rejects_bad_inputs():
    explainer = _explainer(PaintingMaker())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explainer.explain(query()[None] * 5)
    with pytest.raises(TypeError, match="CounterfactualMaker"):
        CyclicExplainer(brightness_generator(), KeywordLabeler(), object())
    with pytest.raises(TypeError, match="findings"):
        explainer.explain(query()[None], findings="Cardiomegaly")
