"""Instruction editing (`--variant instruct`, `instruct-rse`): the 8-channel UNet, the pipeline's folder
round trip, our loop against diffusers' own `__call__`, masks, instructions, training and resume, the cycle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cyclex.counterfactuals import available_makers, create_maker
from cyclex.counterfactuals.instruct import (
    InstructEditMaker,
    InstructionTemplates,
    InstructRegionEditMaker,
    load_instruct_pipeline,
    mask_side,
)
from cyclex.demo.tiny_sd import tiny_sd_components
from cyclex.tailored_training.instruct_training import (
    InstructTrainingConfig,
    conditioning_dropout,
    instruct_unet_from,
    phantom_instruction_pairs,
    train_instruct,
)

STEPS = 4
SOURCE = ["The lung with abnormalities Cardiomegaly, Pleural Effusion", "The lung with abnormalities Edema"]
TARGET = ["The lung with abnormalities Pleural Effusion", "The lung with no abnormalities"]


def tiny_instruct_pipeline(seed: int = 0):
    """A tiny InstructPix2Pix pipeline: tiny SD parts, the UNet widened to 8 channels, the image
    channels' weights randomised so the image latent matters (an untrained editor ignores it)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    parts = tiny_sd_components()
    unet = instruct_unet_from(parts["unet"])
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet,
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_instruct_pipeline()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def test_the_widened_unet_starts_as_the_tailored_one():
    unet = tiny_sd_components()["unet"]
    wide = instruct_unet_from(unet)
    assert wide.config.in_channels == 8 and unet.config.in_channels == 4
    assert float(wide.conv_in.weight[:, 4:].detach().abs().max()) == 0.0
    z, image = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    hidden = torch.randn(2, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.cat([z, image], 1), 500, hidden).sample, unet(z, 500, hidden).sample,
                                   rtol=0, atol=1e-6)


def test_pipeline_round_trips_save_pretrained(pipe, images, tmp_path):
    pipe.save_pretrained(tmp_path / "editor")
    loaded = load_instruct_pipeline(tmp_path / "editor")
    assert type(loaded).__name__ == "StableDiffusionInstructPix2PixPipeline" and loaded.unet.config.in_channels == 8
    for name, tensor in pipe.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], tensor, rtol=0, atol=0)
    a = InstructEditMaker(pipe, STEPS).make(images, SOURCE, TARGET, seed=3)
    b = InstructEditMaker(loaded, STEPS).make(images, SOURCE, TARGET, seed=3)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
    assert a.images.shape == images.shape and 0 <= float(a.images.min()) and float(a.images.max()) <= 1


def test_a_plain_sd_folder_is_refused(tmp_path):
    from cyclex.demo.tiny_sd import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="input channels"):
        load_instruct_pipeline(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_instruct_pipeline(tmp_path)


def test_our_loop_is_the_pipelines_call(pipe, images):
    """Three-way guidance eps_u + s_I (eps_I - eps_u) + s_T (eps_TI - eps_I), as diffusers' __call__."""
    from diffusers import DDIMScheduler

    maker = InstructEditMaker(pipe, STEPS, guidance_scale=7.5, image_guidance_scale=1.5)
    instructions = maker.instructions(SOURCE, TARGET)
    image_latents, z_query = maker.encode_queries(images)
    noise = torch.randn(z_query.shape, generator=torch.Generator().manual_seed(1))
    ours = maker.sample(noise, z_query, image_latents, maker.encode_text(instructions), maker.encode_text(["", ""]))
    reference = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    reference.set_progress_bar_config(disable=True)
    theirs = reference(instructions, image=images.repeat(1, 3, 1, 1), num_inference_steps=STEPS, guidance_scale=7.5,
                       image_guidance_scale=1.5, latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _half_mask(b=2, size=64):
    mask = torch.zeros(b, 1, size, size)
    mask[..., :, size // 2:] = 1
    return mask


def test_outside_the_mask_the_latent_and_with_paste_the_pixels_are_the_querys(pipe, images):
    maker = InstructEditMaker(pipe, STEPS, paste_query_outside_mask=False)
    image_latents, z_query = maker.encode_queries(images)
    latent_mask = torch.zeros(2, 1, 16, 16)
    latent_mask[..., 8:] = 1
    text, empty = maker.encode_text(maker.instructions(SOURCE, TARGET)), maker.encode_text(["", ""])
    z0 = maker.sample(torch.randn(z_query.shape), z_query, image_latents, text, empty, latent_mask)
    outside = (latent_mask == 0).expand_as(z0)
    torch.testing.assert_close(z0[outside], z_query[outside], rtol=0, atol=0)
    assert not torch.allclose(z0[~outside], z_query[~outside])
    pasted = InstructEditMaker(pipe, STEPS).make(images, SOURCE, TARGET, masks=_half_mask())
    torch.testing.assert_close(pasted.images[..., :32], images[..., :32], rtol=0, atol=0)


def test_instructions_from_findings_with_configurable_templates():
    templates = InstructionTemplates()
    assert templates.for_prompts(SOURCE[0], TARGET[0]) == "Remove the cardiomegaly"
    assert templates.for_prompts(TARGET[0], SOURCE[0]) == "Add cardiomegaly"
    assert templates.for_prompts(SOURCE[0], SOURCE[0]) == ""
    assert templates.for_prompts(SOURCE[0], "The lung with no abnormalities") == \
        "Remove the cardiomegaly. Remove the pleural effusion"
    assert templates.sentence("change", "Pleural Effusion", severity="mild") == "Change the pleural effusion to mild"
    assert templates.sentence("remove", "Pleural Effusion", location="left") == "Remove the pleural effusion in the left lung"
    custom = InstructionTemplates(remove="Erase {finding}", location="")
    assert custom.sentence("remove", "Edema", location="left") == "Erase edema"
    with pytest.raises(ValueError, match="remove must contain"):
        InstructionTemplates(remove="Erase it")
    mask = np.zeros((8, 8))
    mask[:, :3] = 1
    assert mask_side(mask) == "right" and mask_side(mask[:, ::-1]) == "left" and mask_side(np.ones((8, 8))) is None


def test_location_from_the_callers_mask(pipe):
    maker = InstructEditMaker(pipe, STEPS, location_from_mask=True)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 40:] = 1  # the image's right side: the patient's left in a PA film
    assert maker.instructions(SOURCE[:1], TARGET[:1], masks) == ["Remove the cardiomegaly in the left lung"]


def test_relevance_is_deterministic_and_zero_without_an_instruction(pipe, images):
    maker = InstructRegionEditMaker(pipe, STEPS, relevance_draws=3)
    image_latents, z_query = maker.encode_queries(images)
    text, empty = maker.encode_text(maker.instructions(SOURCE, TARGET)), maker.encode_text(["", ""])
    a = maker.relevance_maps(z_query, image_latents, text, empty, seed=1)
    torch.testing.assert_close(a, maker.relevance_maps(z_query, image_latents, text, empty, seed=1), rtol=0, atol=0)
    assert not torch.equal(a, maker.relevance_maps(z_query, image_latents, text, empty, seed=2))
    assert a.shape == (2, 16, 16) and float(a.min()) == 0.0 and float(a.max()) == 1.0
    assert float(maker.relevance_maps(z_query, image_latents, empty, empty, seed=1).max()) == 0.0
    out = maker.make(images, SOURCE, TARGET, seed=0)
    assert set(out.extras) == {"guidance_map", "edit_mask"} and out.extras["guidance_map"].shape == (2, 1, 64, 64)
    outside = out.extras["edit_mask"] == 0
    assert outside.any()
    torch.testing.assert_close(out.images[outside], images[outside], rtol=0, atol=0)  # pasted by default


def test_registered_factories_load_the_editor(pipe, tmp_path):
    from cyclex.demo.tiny_sd import tiny_sd_pipeline

    assert {"instruct", "instruct-rse"} <= set(available_makers())
    pipe.save_pretrained(tmp_path / "editor")
    maker = create_maker("instruct", tiny_sd_pipeline(), instruct_model=str(tmp_path / "editor"),
                         num_inference_steps=STEPS, templates={"remove": "Take away the {finding}"})
    assert maker.settings()["instruct_model"] == str(tmp_path / "editor")
    assert maker.instructions(SOURCE[:1], TARGET[:1]) == ["Take away the cardiomegaly"]
    with pytest.raises(ValueError, match="instruct_model="):
        create_maker("instruct", tiny_sd_pipeline())
    rse = create_maker("instruct-rse", pipe, num_inference_steps=STEPS, tau=0.3)
    assert rse.settings()["variant"] == "instruct-rse" and rse.settings()["tau"] == 0.3
    with pytest.raises(ValueError, match="tau"):
        InstructRegionEditMaker(pipe, STEPS, tau=2.0)


def test_conditioning_dropout_shares():
    drop_text, drop_image = conditioning_dropout(100_000, 0.05, torch.Generator().manual_seed(0))
    text_only, both, image_only = (drop_text & ~drop_image), (drop_text & drop_image), (~drop_text & drop_image)
    for share in (text_only, both, image_only):
        assert abs(float(share.float().mean()) - 0.05) < 0.005


def test_phantom_pairs_are_exact_counterfactuals():
    from cyclex.datasets.phantom import PhantomConfig, make_phantoms, without_finding

    pairs = phantom_instruction_pairs(6, 912_345, PhantomConfig(size=64), include_add=True)
    phantoms = {p.id: p for p in make_phantoms(6, 912_345, PhantomConfig(size=64))}
    first = pairs[0]
    phantom_id, finding, kind = first["id"].split("/")
    assert kind == "remove" and first["instruction"] == f"Remove the {finding.lower()}"
    np.testing.assert_array_equal(first["original"], phantoms[phantom_id].image)
    np.testing.assert_array_equal(first["edited"], without_finding(phantoms[phantom_id], finding, PhantomConfig(size=64)).image)
    assert pairs[1]["instruction"].startswith("Add ") and np.array_equal(pairs[1]["original"], first["edited"])


def _tiny_base(folder):
    from cyclex.demo.tiny_sd import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_training_writes_an_editor_and_resumes_exactly(tmp_path):
    from cyclex.datasets.phantom import PhantomConfig

    base = _tiny_base(tmp_path / "base")
    pairs = phantom_instruction_pairs(4, 912_346, PhantomConfig(size=64))
    config = InstructTrainingConfig(train_batch_size=2, max_train_steps=4, checkpointing_steps=2,
                                    learning_rate=1e-3, conditioning_dropout_prob=0.2)
    straight = train_instruct(pairs, base, tmp_path / "straight", config)
    assert straight.global_step == 4
    editor = load_instruct_pipeline(tmp_path / "straight")
    assert editor.unet.config.in_channels == 8
    assert json.loads((tmp_path / "straight" / "cyclex_instruct.json").read_text())["n_pairs"] == len(pairs)
    # a run killed after its step-2 checkpoint: the rerun resumes there and ends where the straight one did
    train_instruct(pairs, base, tmp_path / "resumed", config)
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "checkpoint-000004")
    shutil.rmtree(tmp_path / "resumed" / "unet")
    resumed = train_instruct(pairs, base, tmp_path / "resumed", config)
    assert resumed.global_step == 4 and resumed.checkpoints == ["checkpoints/checkpoint-000004"]
    again = load_instruct_pipeline(tmp_path / "resumed")
    for name, tensor in editor.unet.state_dict().items():
        torch.testing.assert_close(again.unet.state_dict()[name], tensor, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="another instruct training run"):
        train_instruct(pairs[:2], base, tmp_path / "resumed", config)


def test_the_maker_works_in_the_cycle_and_in_three_lines(pipe, tmp_path):
    from cycle_fakes import KeywordLabeler, brightness_generator, query, write_tiny_tailored

    from cyclex.cycle import CyclicExplainer

    pipe.save_pretrained(tmp_path / "editor")
    tailored = write_tiny_tailored(tmp_path / "sd")
    explainer = CyclicExplainer.from_pretrained(tailored, generator=brightness_generator(), labeler=KeywordLabeler(),
                                                variant="instruct", instruct_model=str(tmp_path / "editor"),
                                                num_inference_steps=STEPS)
    results = explainer.explain([query(0.9, 0.9)[0].numpy()])
    assert results and all(r.counterfactual.shape[-2:] == (64, 64) for r in results)
    assert {r.maker_details["instruction"] for r in results} >= {"Remove the cardiomegaly"}


def test_cli_explain_with_the_instruct_variants(pipe, tmp_path):
    from cycle_fakes import query, write_tiny_tailored
    from PIL import Image
    from typer.testing import CliRunner

    from cyclex.cli import app

    pipe.save_pretrained(tmp_path / "editor")
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.uint8(query(0.9, 0.9)[0].numpy() * 255 + 0.5)).save(folder / "a.png")
    base = ["explain", "--generator", "python:cycle_fakes:brightness_reports",
            "--tailored", str(write_tiny_tailored(tmp_path / "sd")), "--images", str(folder), "--steps", "2",
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly",
            "--instruct-model", str(tmp_path / "editor")]
    for variant in ("instruct", "instruct-rse"):
        out = tmp_path / variant
        result = CliRunner().invoke(app, [*base, "--variant", variant, "--out", str(out)])
        assert result.exit_code == 0, result.output
        line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        assert line["settings"]["variant"] == variant and line["settings"]["instruct_model"] == str(tmp_path / "editor")
        assert ("guidance_map_npy" in line["files"]) == (variant == "instruct-rse")
    missing = CliRunner().invoke(app, [*base[:-2], "--variant", "instruct", "--out", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "--instruct-model" in missing.output


def test_the_shipped_demo_editor_loads_and_is_small():
    from cyclex.demo.instruct_model import DEMO_INSTRUCT_DIR, resolve_instruct_model

    assert resolve_instruct_model("demo") == str(DEMO_INSTRUCT_DIR)
    assert resolve_instruct_model("some/hub-id") == "some/hub-id"
    sizes = {p.name: p.stat().st_size for p in DEMO_INSTRUCT_DIR.rglob("*") if p.is_file()}
    assert sizes and max(sizes.values()) < 3 * 2**20
    editor = load_instruct_pipeline(DEMO_INSTRUCT_DIR)
    assert editor.unet.config.in_channels == 8 and editor.unet.dtype == torch.float32
    record = json.loads((DEMO_INSTRUCT_DIR / "cyclex_instruct.json").read_text())
    assert record["global_step"] == 2000 and "demo_instruct_training" in record["data"]
