"""Null-text inversion and the fast inversions on a tiny random Stable Diffusion (5 DDIM steps)."""

from __future__ import annotations

import json

import pytest
import torch

from cyclex.counterfactuals import create_maker
from cyclex.counterfactuals.diffusion import LatentDiffusion
from cyclex.counterfactuals.fast_inversion import DirectInversionMaker, NegativePromptInversionMaker
from cyclex.counterfactuals.inversion import strength_to_start_index
from cyclex.counterfactuals.inversion_cache import InversionCache, inversion_key
from cyclex.counterfactuals.nti import NullTextInversionMaker, resolve_null_setting
from cyclex.demo.tiny_sd import tiny_sd_pipeline

STEPS = 5
SOURCE = ["The lung with abnormalities Cardiomegaly, Pleural Effusion", "The lung with abnormalities Edema"]
TARGET = ["The lung with abnormalities Pleural Effusion", "The lung with no abnormalities"]



@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(2, 1, 64, 64)


@pytest.fixture(scope="module")
def nti_run(pipe, images):
    ld = LatentDiffusion(pipe, STEPS)
    maker = NullTextInversionMaker(ld, STEPS, guidance_scale=7.5)
    inversion = maker.invert(images, SOURCE)
    return ld, maker, inversion


def test_nti_reconstructs_better_than_plain_ddim_at_guidance_7_5(nti_run, images):
    ld, maker, inversion = nti_run
    z0 = ld.encode_images(images)
    cond = ld.encode_prompts(SOURCE)
    trajectory = ld.ddim_invert(z0, cond, guidance=1.0)
    plain = ld.ddim_sample(trajectory[-1], cond, guidance=7.5)
    # The engine's sampler with NTI's per-step null embeddings (independent of our own loop).
    nti = ld.ddim_sample(trajectory[-1], cond, guidance=7.5, uncond_per_step=list(inversion.null_embeds))
    plain_error = (plain - z0).pow(2).mean().item()
    nti_error = (nti - z0).pow(2).mean().item()
    assert nti_error < 0.9 * plain_error, (nti_error, plain_error)
    # Our sampling loop agrees with the engine's for the same embeddings.
    ours = maker.edit(inversion, SOURCE)[:, 0]
    assert torch.allclose(ours, ld.decode_latents(nti), atol=1e-4)
    assert inversion.null_embeds.shape == (STEPS, 2, *cond.shape[1:])
    assert inversion.null_loss.shape == (STEPS, 2)


def test_nti_with_a_half_precision_unet_optimises_the_null_text_in_float32(images):
    ld = LatentDiffusion(tiny_sd_pipeline().to(torch.bfloat16), STEPS)  # bf16: CPU kernels exist for it
    maker = NullTextInversionMaker(ld, STEPS, guidance_scale=7.5)
    inversion = maker.invert(images, SOURCE)
    assert inversion.null_embeds.dtype == torch.float32 and ld.dtype == torch.bfloat16
    z0 = ld.encode_images(images)
    cond = ld.encode_prompts(SOURCE)
    trajectory = ld.ddim_invert(z0, cond, guidance=1.0)
    plain = ld.ddim_sample(trajectory[-1], cond, guidance=7.5)
    nti = ld.ddim_sample(trajectory[-1], cond, guidance=7.5, uncond_per_step=list(inversion.null_embeds))
    plain_error = (plain.float() - z0.float()).pow(2).mean().item()
    nti_error = (nti.float() - z0.float()).pow(2).mean().item()
    assert nti_error < 0.9 * plain_error, (nti_error, plain_error)
    assert torch.isfinite(maker.edit(inversion, TARGET).float()).all()


def test_inversion_is_cached_per_item_and_pivot_shared(nti_run, images):
    ld, maker, first = nti_run
    assert first.cache_hits == 0 and first.unet_calls > 0
    before = ld.unet_calls
    again = maker.invert(images.flip(0), list(reversed(SOURCE)))  # same pairs, other order
    assert again.cache_hits == 2 and again.unet_calls == 0 and ld.unet_calls == before
    assert torch.equal(again.null_embeds[:, 0], first.null_embeds[:, 1])
    # The guidance-1 pivot is shared across methods and null settings: direct inversion only pays
    # its 2 T pivot noise predictions per image.
    direct = DirectInversionMaker(ld, STEPS, cache=maker.cache)
    assert direct.invert(images, SOURCE).unet_calls == 2 * STEPS * 2
    negative = NegativePromptInversionMaker(ld, STEPS, cache=maker.cache)
    assert negative.invert(images, SOURCE).unet_calls == 0
    inner = 2
    cheap = maker.with_null_setting((inner, 0.0))  # eps 0: never stops early, exact count
    cost = cheap.invert(images, SOURCE).unet_calls
    assert cost == STEPS * 2 * (1 + inner + 1)  # no pivot recomputed: T * B * (cond + inner + step)




def test_one_inversion_serves_every_strength_and_guidance_batch(nti_run):
    ld, maker, inversion = nti_run
    before = ld.unet_calls
    batch = maker.edit(inversion, TARGET, guidances=[7.0, 9.0], strength=0.8)
    start = strength_to_start_index(0.8, STEPS)
    assert start == 1
    assert ld.unet_calls - before == 2 * 2 * 2 * (STEPS - start)  # CFG pair x items x guidances x steps
    single = maker.edit(inversion, TARGET, guidances=[9.0], strength=0.8)
    assert batch.shape == (2, 2, 1, 64, 64)
    assert torch.allclose(batch[:, 1], single[:, 0], atol=1e-4)
    assert not torch.allclose(batch[:, 0], batch[:, 1], atol=1e-4)


def test_direct_inversion_reconstructs_the_source_exactly(pipe, images):
    ld = LatentDiffusion(pipe, STEPS)
    maker = DirectInversionMaker(ld, STEPS)
    inversion = maker.invert(images, SOURCE)
    out = maker.edit(inversion, SOURCE, guidances=[7.5, 10.0])
    reference = ld.decode_latents(inversion.trajectory[0])
    plain = ld.decode_latents(ld.ddim_sample(inversion.trajectory[-1], inversion.cond_embeds, guidance=7.5))
    plain_error = (plain - reference).abs().mean()
    for g in range(2):
        # Exact up to float noise of different batch compositions (amplified by w on random weights).
        # measured 0.003 / 0.006 (w 7.5 / 10) typically, once 0.011 in a full make-test run: CPU kernels
        # round batches of 2 (the pivot fit) and 4 (the edit) differently from run to run, w amplifies it
        assert (out[:, g] - reference).abs().max() < 2e-2
        assert (out[:, g] - reference).abs().mean() < 0.05 * plain_error
    edited = maker.edit(inversion, TARGET)
    assert (edited[:, 0] - reference).abs().mean() > 10 * (out[:, 0] - reference).abs().mean()


def test_zero_mask_keeps_the_pivot(nti_run, images):
    ld, maker, inversion = nti_run
    out = maker.edit(inversion, TARGET, masks=torch.zeros(2, 1, 64, 64))
    assert torch.allclose(out[:, 0], ld.decode_latents(inversion.trajectory[0]), atol=1e-5)


def test_make_returns_counterfactuals_with_serialisable_details(nti_run, images):
    _, maker, _ = nti_run
    out = maker.make(images, SOURCE, TARGET, seed=3)
    assert out.images.shape == (2, 1, 64, 64)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.extras["null_text_loss"].shape == (2, STEPS)
    line = json.loads(json.dumps(out.details[0]))
    assert line["variant"] == "nti" and line["null_setting"] == "default" and line["seed"] == 3
    with pytest.raises(ValueError, match="one source and one target prompt"):
        maker.make(images, SOURCE[:1], TARGET)


def test_disk_cache_round_trip_and_refuses_image_folders(tmp_path, images):
    folder = tmp_path / "run" / "cache"
    cache = InversionCache(folder)
    key = inversion_key(images[0], SOURCE[0], "best_l2", {"method": "nti"})
    assert key != inversion_key(images[0], SOURCE[0], "best_l1", {"method": "nti"})
    tensors = {"trajectory": torch.randn(3, 4, 2, 2)}
    cache.put(key, tensors, {"prompt": SOURCE[0]})
    fresh = InversionCache(folder)
    loaded = fresh.get(key)
    assert torch.equal(loaded["trajectory"], tensors["trajectory"])
    assert fresh.stats() == {"hits": 1, "disk_hits": 1, "misses": 0, "entries": 1}
    assert fresh.get("0" * 64) is None and fresh.misses == 1
    user_images = tmp_path / "xrays"
    user_images.mkdir()
    (user_images / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="holds images"):
        InversionCache(user_images)


def test_settings_validation_and_registry(pipe):
    assert resolve_null_setting("underfit") == ("underfit", 8, 5e-4)
    assert resolve_null_setting((3, 0.1))[1:] == (3, 0.1)
    with pytest.raises(ValueError, match="null_setting"):
        resolve_null_setting("overfit")
    with pytest.raises(ValueError, match="strength"):
        strength_to_start_index(0.0, 10)
    maker = create_maker("nti", pipe, num_inference_steps=4, null_setting="underfit")
    assert isinstance(maker, NullTextInversionMaker) and maker.inner_steps == 8
    assert isinstance(create_maker("negative-prompt", pipe, num_inference_steps=4), NegativePromptInversionMaker)
    assert isinstance(create_maker("direct", pipe, num_inference_steps=4), DirectInversionMaker)


def test_search_reuses_one_inversion_for_every_strength_and_guidance(nti_run, images):
    from cyclex.counterfactuals.search import MetricGuidedSearch
    from cyclex.explain.scores import cf_score

    ld, maker, _ = nti_run
    makers = {"best_l2": maker, "best_l1": maker.replace(checkpoint="best_l1")}
    never = lambda factual, cfs, finding: [cf_score(1.0, 0.0, 1.0, 0.0, 0.0) for _ in range(cfs.shape[0])]  # noqa: E731
    search = MetricGuidedSearch(makers, never, lambda imgs, f: [False] * len(f), null_settings=("default",),
                                strengths=(1.0, 0.8), guidances=(7, 9))
    before = ld.unet_calls
    result = search.search(images[0], SOURCE[0], TARGET[0], "Cardiomegaly")
    assert not result.accepted and len(result.attempts) == 2 * 2 * 2
    assert result.unet_calls == ld.unet_calls - before
    # best_l2 was inverted by the fixture (cache hit): its attempts cost sampling only,
    # 2 (CFG) x 2 guidances x (5 + 4 steps) for delta 1.0 and 0.8.
    best_l2_calls = sum(a["unet_calls"] for a in result.attempts if a["checkpoint"] == "best_l2")
    assert best_l2_calls == 2 * 2 * (5 + 4)
    # Forward passes: the guidance batch is one pass per step; best_l1 adds its pivot (5) and the
    # NTI fit (cond + inner iterations + step per step, at least 3 per step).
    assert result.unet_passes >= (5 + 4) * 2 + 5 + 3 * 5
    best_l1_calls = sum(a["unet_calls"] for a in result.attempts if a["checkpoint"] == "best_l1")
    assert best_l1_calls > best_l2_calls + STEPS  # its own pivot and null-text fit


def test_fast_null_settings_give_siblings_that_share_model_and_cache(nti_run, images):
    ld, maker, first = nti_run
    negative = maker.with_null_setting("negative-prompt")
    direct = maker.with_null_setting("direct")
    assert isinstance(negative, NegativePromptInversionMaker) and isinstance(direct, DirectInversionMaker)
    for sibling in (negative, direct):
        assert sibling.ld is ld and sibling.cache is maker.cache and sibling.checkpoint == maker.checkpoint
        assert sibling.num_inference_steps == STEPS and sibling.guidance_scale == maker.guidance_scale
    before = ld.unet_calls
    assert negative.invert(images, SOURCE).unet_calls == 0  # the pivot comes from the shared cache
    assert ld.unet_calls == before
    with pytest.raises(ValueError, match="null_setting"):
        maker.with_null_setting("nonsense")
