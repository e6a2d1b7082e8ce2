"""LatentDiffusion (contract C5) on tiny random Stable Diffusion components."""

from __future__ import annotations

import pytest
import torch

from cyclex.counterfactuals.diffusion import LatentDiffusion
from cyclex.demo.tiny_sd import tiny_sd_pipeline

STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd_pipeline()
    # A random UNet predicts wildly different noise for nearby latents, which no trained model does;
    # damping its output layer gives the smooth eps(z, t) that DDIM inversion assumes.
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.02)
        pipe.unet.conv_out.bias.mul_(0.02)
    return pipe


@pytest.fixture()
def diffusion(pipe):
    return LatentDiffusion(pipe, num_inference_steps=STEPS)


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 64, 64, generator=g)


def test_shapes_and_schedule(diffusion):
    latents = diffusion.encode_images(_images())
    assert latents.shape == (2, 4, 16, 16)
    assert diffusion.timesteps.tolist() == sorted(diffusion.timesteps.tolist(), reverse=True)
    assert len(diffusion.timesteps) == STEPS
    # trajectory[k] sits at sampling step T - k: the inverse schedule is the sampling one reversed
    assert diffusion.inverse_scheduler.timesteps.tolist() == diffusion.timesteps.flip(0).tolist()
    decoded = diffusion.decode_latents(latents)
    assert decoded.shape == (2, 1, 64, 64)
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    embeds = diffusion.encode_prompts(["The lung with no abnormalities", "The lung with abnormalities Edema"])
    assert embeds.shape == (2, 48, 32)


def test_encode_is_deterministic_and_scaled(diffusion, pipe):
    images = _images()
    a = diffusion.encode_images(images)
    b = diffusion.encode_images(images)
    assert torch.equal(a, b)
    raw = pipe.vae.encode(images.repeat(1, 3, 1, 1) * 2 - 1).latent_dist.mean
    torch.testing.assert_close(a, raw * pipe.vae.config.scaling_factor)


def test_inversion_then_sampling_at_guidance_one_reconstructs(diffusion):
    # Unit-scale latents, like a real SD VAE's scaled latents (the tiny random VAE's are ~0.04).
    # Measured: relative error 0.009 at T=10 (0.003 at T=50); an undamped random UNet gives ~1.0.
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = diffusion.encode_prompts(["The lung with abnormalities Cardiomegaly"] * 2)
    trajectory = diffusion.ddim_invert(z0, cond)
    assert len(trajectory) == STEPS + 1
    assert torch.equal(trajectory[0], z0)
    # z_T sits at the last noise level: sqrt(alpha_bar_T) ~ 0.07 shrinks the signal, so it is far from z_0
    assert float((trajectory[-1] - z0).abs().mean()) > 0.5 * float(z0.abs().mean())
    recon = diffusion.ddim_sample(trajectory[-1], cond, guidance=1.0)
    error = float((recon - z0).abs().mean()) / float(z0.abs().mean())
    assert error < 0.03, f"relative reconstruction error {error:.4f}"
    # starting halfway down the same trajectory (strength 0.5) reconstructs too
    half = diffusion.ddim_sample(trajectory[STEPS // 2], cond, guidance=1.0, start_index=STEPS - STEPS // 2)
    assert float((half - z0).abs().mean()) / float(z0.abs().mean()) < 0.03


def test_unet_call_counting(diffusion):
    z0 = diffusion.encode_images(_images(3))
    cond = diffusion.encode_prompts(["The lung with no abnormalities"] * 3)
    diffusion.ddim_invert(z0, cond)
    assert diffusion.unet_calls == 3 * STEPS and diffusion.unet_forward_passes == STEPS
    diffusion.ddim_sample(torch.randn_like(z0), cond, guidance=7.5, start_index=4)
    # CFG: one pass of 2B per remaining step
    assert diffusion.unet_forward_passes == STEPS + (STEPS - 4)
    assert diffusion.unet_calls == 3 * STEPS + 2 * 3 * (STEPS - 4)


def test_guidance_and_per_step_null_embeddings(diffusion):
    z0 = diffusion.encode_images(_images(1))
    cond = diffusion.encode_prompts(["The lung with abnormalities Edema"])
    uncond = diffusion.encode_prompts([""])
    zt = torch.full_like(z0, 0.3)
    plain = diffusion.ddim_sample(zt, cond, uncond, guidance=7.5)
    same = diffusion.ddim_sample(zt, cond, None, guidance=7.5, uncond_per_step=[uncond] * STEPS)
    torch.testing.assert_close(plain, same)
    shifted = diffusion.ddim_sample(zt, cond, uncond, guidance=7.5, uncond_per_step=[uncond + 1.0] * STEPS)
    assert not torch.allclose(plain, shifted)
    cond_only = diffusion.ddim_sample(zt, cond, uncond, guidance=1.0)
    assert not torch.allclose(plain, cond_only)


def test_bad_inputs_are_named(diffusion):
    with pytest.raises(ValueError, match="images must be"):
        diffusion.encode_images(torch.rand(2, 3, 64, 64))
    z0 = diffusion.encode_images(_images(1))
    cond = diffusion.encode_prompts(["x"])
    with pytest.raises(ValueError, match="start_index"):
        diffusion.ddim_sample(z0, cond, start_index=STEPS)
    with pytest.raises(ValueError, match="uncond_per_step"):
        diffusion.ddim_sample(z0, cond, uncond_per_step=[cond])
    with pytest.raises(ValueError, match="num_inference_steps"):
        LatentDiffusion(diffusion.pipe, num_inference_steps=0)


def test_any_scheduler_config_gives_matching_ddim_schedules(pipe):
    from diffusers import PNDMScheduler

    original = pipe.scheduler
    try:
        pipe.scheduler = PNDMScheduler.from_config({**original.config, "timestep_spacing": "linspace"})
        other = LatentDiffusion(pipe, num_inference_steps=STEPS)
    finally:
        pipe.scheduler = original
    assert type(other.scheduler).__name__ == "DDIMScheduler"
    assert other.inverse_scheduler.timesteps.tolist() == other.timesteps.flip(0).tolist()
