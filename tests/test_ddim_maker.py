"""DDIMCounterfactualMaker: batching, inversion cache, strength, registry."""

from __future__ import annotations

import pytest
import torch

from cyclex.counterfactuals import available_makers, create_maker, register_maker
from cyclex.counterfactuals.ddim import DDIMCounterfactualMaker
from cyclex.demo.tiny_sd import tiny_sd_pipeline

STEPS = 6
SOURCE = "The lung with abnormalities Cardiomegaly, Edema"


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def _images(n, seed=0, size=64):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_findings_of_one_image_share_one_inversion(pipe):
    maker = DDIMCounterfactualMaker(pipe, num_inference_steps=STEPS, guidance_scale=7.5)
    image = _images(1)
    images = image.repeat(2, 1, 1, 1)
    targets = ["The lung with abnormalities Edema", "The lung with abnormalities Cardiomegaly"]
    out = maker.make(images, [SOURCE, SOURCE], targets)
    assert out.images.shape == (2, 1, 64, 64)
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1
    # one inversion of one latent (STEPS evaluations) + CFG sampling of 2 requests (2 x 2 x STEPS)
    assert maker.inversions_run == 1
    assert maker.diffusion.unet_calls == STEPS + 2 * 2 * STEPS
    assert [d["inversion_cached"] for d in out.details] == [False, False]
    # a later call for the same image + prompt reuses the cached inversion: sampling calls only
    again = maker.make(image, [SOURCE], targets[:1])
    assert maker.inversions_run == 1
    assert maker.diffusion.unet_calls == STEPS + 2 * 2 * STEPS + 2 * STEPS
    assert again.details[0]["inversion_cached"] is True
    torch.testing.assert_close(again.images[0], out.images[0], atol=2e-3, rtol=0)  # batch of 1 vs 2: rounding
    # a different source prompt is a different inversion
    maker.make(image, ["The lung with abnormalities Edema"], ["The lung with no abnormalities"])
    assert maker.inversions_run == 2


def test_batch_equals_one_by_one(pipe):
    maker = DDIMCounterfactualMaker(pipe, num_inference_steps=STEPS)
    images = _images(3, seed=1)
    sources = [SOURCE, "The lung with abnormalities Edema", SOURCE]
    targets = ["The lung with abnormalities Edema", "The lung with no abnormalities", "The lung with abnormalities Cardiomegaly"]
    batched = maker.make(images, sources, targets).images
    maker.clear_cache()
    single = torch.cat([maker.make(images[i : i + 1], sources[i : i + 1], targets[i : i + 1]).images for i in range(3)])
    # batched matmuls round differently; the random UNet amplifies that to ~4e-4
    torch.testing.assert_close(batched, single, atol=2e-3, rtol=0)


def test_strength_starts_later_on_the_same_trajectory(pipe):
    full = DDIMCounterfactualMaker(pipe, num_inference_steps=STEPS, strength=1.0)
    half = DDIMCounterfactualMaker(pipe, num_inference_steps=STEPS, strength=0.5)
    image = _images(1, seed=2)
    a = full.make(image, [SOURCE], ["The lung with no abnormalities"])
    b = half.make(image, [SOURCE], ["The lung with no abnormalities"])
    assert a.details[0]["start_index"] == 0 and b.details[0]["start_index"] == STEPS - 3
    # sampling from z_3 costs 3 guided steps instead of STEPS
    assert half.diffusion.unet_calls == STEPS + 2 * 3
    assert not torch.allclose(a.images, b.images)


def test_deterministic_and_resizes_back(pipe):
    maker = DDIMCounterfactualMaker(pipe, num_inference_steps=STEPS)
    image = _images(1, seed=3, size=96)
    a = maker.make(image, [SOURCE], ["The lung with abnormalities Edema"], seed=0)
    maker.clear_cache()
    b = maker.make(image, [SOURCE], ["The lung with abnormalities Edema"], seed=0)
    assert a.images.shape == (1, 1, 96, 96)
    torch.testing.assert_close(a.images, b.images)


def test_mask_keeps_query_outside(pipe):
    maker = DDIMCounterfactualMaker(pipe, num_inference_steps=STEPS)
    image = _images(1, seed=4)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    out = maker.make(image, [SOURCE], ["The lung with no abnormalities"], masks=mask).images
    torch.testing.assert_close(out[..., :16, :], image[..., :16, :])
    assert not torch.allclose(out[..., 16:48, 16:48], image[..., 16:48, 16:48])


def test_registry_and_errors(pipe):
    assert "ddim" in available_makers()
    maker = create_maker("ddim", pipe, num_inference_steps=STEPS, guidance_scale=8.0)
    assert isinstance(maker, DDIMCounterfactualMaker)
    assert maker.settings()["guidance"] == 8.0 and maker.settings()["variant"] == "ddim"
    register_maker("Test-Variant", lambda pipe, **settings: DDIMCounterfactualMaker(pipe, **settings))
    assert "test-variant" in available_makers()
    assert create_maker("test-variant", pipe, num_inference_steps=2).num_inference_steps == 2
    with pytest.raises(KeyError, match="unknown counterfactual variant"):
        create_maker("no_such_variant", pipe)
    with pytest.raises(ValueError, match="strength"):
        DDIMCounterfactualMaker(pipe, strength=0.0)
    with pytest.raises(ValueError, match="one source and one target prompt"):
        maker.make(_images(2), [SOURCE], [SOURCE, SOURCE])
