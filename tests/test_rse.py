"""Region-specific editing: relevance maps, pseudo masks, masked denoising at timesteps[i + 1]."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cyclex.counterfactuals import available_makers, create_maker
from cyclex.counterfactuals.diffusion import LatentDiffusion
from cyclex.counterfactuals.rse import RegionSpecificEditMaker, robust_normalise
from cyclex.demo.tiny_sd import tiny_sd_pipeline

STEPS = 5
SOURCE = ["The lung with abnormalities Cardiomegaly, Pleural Effusion", "The lung with abnormalities Edema"]
TARGET = ["The lung with abnormalities Pleural Effusion", "The lung with no abnormalities"]


@pytest.fixture(scope="module")
def ld():
    return LatentDiffusion(tiny_sd_pipeline(), STEPS)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def _half_mask(b=2, size=64):
    mask = torch.zeros(b, 1, size, size)
    mask[..., :, size // 2:] = 1  # right half editable
    return mask


def test_outside_the_mask_the_latent_is_the_querys(ld, images):
    maker = RegionSpecificEditMaker(ld, STEPS, guidance_scale=5.0, tau=1e-6)  # a tiny tau: M (and R > 0) decides
    inversion = maker.invert(images, SOURCE)
    region, extras = maker._edit_region(images, inversion, SOURCE, TARGET, _half_mask(), seed=0)
    z0 = maker.edit_latents(inversion, TARGET, masks=region)
    latent_mask = region.to(z0).expand_as(z0) > 0
    outside = ~latent_mask
    assert outside.any() and latent_mask.any()
    # latent for latent: after the last step the background is the clean query latent z*_0
    torch.testing.assert_close(z0[outside], inversion.trajectory[0][outside], rtol=0, atol=0)
    assert not torch.allclose(z0[latent_mask], inversion.trajectory[0][latent_mask])
    assert set(extras) == {"guidance_map", "edit_mask"} and extras["guidance_map"].shape == (2, 1, 64, 64)


def test_background_is_reset_to_the_next_timesteps_latent(ld, images):
    """After sampling step i the sample sits at timesteps[i + 1]: the reset uses trajectory[T - i - 1]
    (a reset to trajectory[T - i], DiffEdit's index, fails here)."""
    maker = RegionSpecificEditMaker(ld, STEPS)
    inversion = maker.invert(images, SOURCE)
    rows = torch.arange(2)
    keep = maker._keep_outside(inversion, rows, torch.zeros(2, 1, 64, 64))
    for i in range(STEPS):
        z = torch.randn_like(inversion.trajectory[0])
        torch.testing.assert_close(keep(i, z), inversion.trajectory[STEPS - i - 1], rtol=0, atol=0)
        assert not torch.allclose(keep(i, z), inversion.trajectory[STEPS - i])


def test_paste_option_keeps_the_querys_pixels(ld, images):
    maker = RegionSpecificEditMaker(ld, STEPS, tau=1e-6, paste_query_outside_mask=True)
    out = maker.make(images, SOURCE, TARGET, masks=_half_mask())
    torch.testing.assert_close(out.images[..., : 32], images[..., : 32], rtol=0, atol=0)
    assert json.loads(json.dumps(out.details[0]))["paste_query_outside_mask"] is True
    plain = RegionSpecificEditMaker(ld, STEPS, tau=1e-6).make(images, SOURCE, TARGET, masks=_half_mask())
    assert not torch.equal(plain.images[..., :32], images[..., :32])  # latent reset only: the VAE redraws it


def test_relevance_is_deterministic_for_a_seed(ld, images):
    maker = RegionSpecificEditMaker(ld, STEPS, relevance_draws=3)
    inversion = maker.invert(images, SOURCE)
    a = maker.relevance_maps(inversion, TARGET, seed=1)
    b = maker.relevance_maps(inversion, TARGET, seed=1)
    c = maker.relevance_maps(inversion, TARGET, seed=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == (2, *inversion.trajectory.shape[-2:]) and float(a.min()) == 0.0 and float(a.max()) == 1.0
    # the same prompt on both sides changes nothing: no relevance anywhere
    same = maker.relevance_maps(inversion, SOURCE, seed=1)
    assert float(same.max()) == 0.0


def test_robust_normalise_by_hand():
    values = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 100.0]]]).view(1, 1, 5)
    # quartiles 1 and 3 -> fence 3 + 1.5 * 2 = 6: 100 is clipped to 6, then min-max
    expected = torch.tensor([0.0, 1 / 6, 2 / 6, 3 / 6, 1.0]).view(1, 1, 5)
    torch.testing.assert_close(robust_normalise(values), expected)


def test_anatomical_prior_limits_the_edit(ld):
    from cyclex.datasets.phantom import PhantomConfig, make_phantom
    from cyclex.explain.anatomical_priors import anatomical_prior
    from cyclex.explain.frames import estimate_chest_box

    phantom = make_phantom(3, PhantomConfig(size=64))
    image = torch.from_numpy(phantom.image)[None, None]
    maker = RegionSpecificEditMaker(ld, STEPS, tau=0.0)
    source, target = ["The lung with abnormalities Pleural Effusion"], ["The lung with no abnormalities"]
    m = maker._pseudo_masks(image, source, target)
    prior = anatomical_prior("Pleural Effusion", (64, 64), estimate_chest_box(phantom.image))
    np.testing.assert_array_equal(m[0, 0].numpy() > 0, prior)
    assert 0 < prior.mean() < 1
    assert maker._pseudo_masks(image, source, source)[0].all()  # nothing removed: no prior applies


def test_registered_and_checked(ld):
    assert "rse" in available_makers()
    maker = create_maker("rse", ld, num_inference_steps=STEPS, tau=0.2)
    assert maker.settings()["variant"] == "rse" and maker.settings()["tau"] == 0.2
    for bad, message in (({"tau": 2.0}, "tau"), ({"relevance_draws": 0}, "relevance_draws"),
                         ({"prior": "boxes"}, "prior"), ({"relevance_strength": 0.0}, "strength")):
        with pytest.raises(ValueError, match=message):
            RegionSpecificEditMaker(ld, STEPS, **bad)


def test_cli_explain_with_rse_writes_the_guidance_maps(tmp_path):
    from cycle_fakes import query, write_tiny_tailored
    from PIL import Image
    from typer.testing import CliRunner

    from cyclex.cli import app

    folder = tmp_path / "in"
    folder.mkdir()
    for image_id, heart in {"a": 0.9, "b": 0.85}.items():
        Image.fromarray(np.uint8(query(heart, 0.9)[0].numpy() * 255 + 0.5)).save(folder / f"{image_id}.png")
    out = tmp_path / "run"
    args = ["explain", "--generator", "python:cycle_fakes:brightness_reports",
            "--tailored", str(write_tiny_tailored(tmp_path / "sd")), "--images", str(folder), "--out", str(out),
            "--steps", "2", "--guidance", "5", "--variant", "rse",
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["settings"]["variant"] == "rse" for line in lines)
    for line in lines:
        guidance = np.load(out / line["files"]["guidance_map_npy"])
        edit_mask = np.load(out / line["files"]["edit_mask_npy"])
        assert guidance.shape == edit_mask.shape == (1, *np.asarray(Image.open(out / line["query_png"])).shape)
        assert 0 <= guidance.min() and guidance.max() <= 1 and set(np.unique(edit_mask)) <= {0.0, 1.0}
        assert (out / line["files"]["guidance_map"]).is_file()
    page = (out / "index.html").read_text()
    assert "guidance_map.png" in page and "RSE guidance map" in page


def test_cli_maker_options_reach_the_maker(tmp_path):
    from cycle_fakes import query, write_tiny_tailored
    from PIL import Image
    from typer.testing import CliRunner

    from cyclex.cli import app, parse_maker_options

    assert parse_maker_options(["tau=0.2", "relevance-draws=8", "prior=none", "paste_query_outside_mask=TRUE"]) == {
        "tau": 0.2, "relevance_draws": 8, "prior": "none", "paste_query_outside_mask": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_maker_options(["tau"])
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.uint8(query(0.9, 0.9)[0].numpy() * 255 + 0.5)).save(folder / "a.png")
    base = ["explain", "--generator", "python:cycle_fakes:brightness_reports",
            "--tailored", str(write_tiny_tailored(tmp_path / "sd")), "--images", str(folder),
            "--steps", "2", "--variant", "rse", "--labeler", "python:cycle_fakes:KeywordLabeler",
            "--findings", "Cardiomegaly"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run"), "--maker-option", "tau=0.3",
                                      "--maker-option", "prior=none"])
    assert result.exit_code == 0, result.output
    line = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert line["settings"]["tau"] == 0.3 and line["settings"]["prior"] == "none"
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--maker-option", "prior=boxes"])
    assert bad.exit_code == 1 and "prior must be one of" in bad.output
