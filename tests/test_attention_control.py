"""Prompt-to-prompt attention processors: exact edits on hand-made maps, restore on exit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cyclex.counterfactuals.attention_control import (
    AttentionControlConfig,
    PromptToPromptController,
    PromptToPromptProcessor,
    align_tokens,
    prompt_to_prompt,
    prompt_token_ids,
)
from cyclex.demo.tiny_sd import tiny_sd_components

SOURCE = "The lung with abnormalities Cardiomegaly, Pleural Effusion"
TARGET = "The lung with abnormalities Pleural Effusion"



@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components()


def test_align_tokens_by_hand():
    mapper, removed = align_tokens([1, 5, 6, 7, 2], [1, 5, 7, 2])
    assert mapper == [0, 1, 3, 4] and removed == [2]
    mapper, removed = align_tokens([1, 5, 2], [1, 9, 5, 2])
    assert mapper == [0, -1, 1, 2] and removed == []


def test_removed_tokens_are_the_dropped_finding(parts):
    tokenizer = parts["tokenizer"]
    controller = PromptToPromptController.from_prompts(tokenizer, [SOURCE], [TARGET], num_steps=10)
    src_ids = prompt_token_ids(tokenizer, [SOURCE])[0]
    removed_ids = [src_ids[i] for i in torch.nonzero(controller.removed_tokens[0]).flatten().tolist()]
    expected = tokenizer("cardiomegaly ,", add_special_tokens=False).input_ids
    assert sorted(removed_ids) == sorted(expected)
    assert controller.token_mapper.shape == (1, tokenizer.model_max_length)
    with pytest.raises(ValueError, match="same token count"):
        PromptToPromptController.from_prompts(tokenizer, [SOURCE], [TARGET], 10, AttentionControlConfig(mode="replace"))


def _controller(mode="refine", **kw):
    mapper = torch.tensor([[0, 2, -1]])  # target token 0 <- source 0, 1 <- source 2, 2 keeps its own
    removed = torch.tensor([[False, True, False]])
    return PromptToPromptController(mapper, removed, num_steps=10, config=AttentionControlConfig(mode=mode, **kw))


def test_refine_copies_aligned_source_columns_in_the_conditional_half():
    controller = _controller()
    heads, q = 2, 4
    probs = torch.rand(4 * heads, q, 3)  # rows: uncond src, uncond tgt, cond src, cond tgt
    out = controller.edit_attention(probs.clone(), heads, is_cross=True).reshape(4, heads, q, 3)
    ref = probs.reshape(4, heads, q, 3)
    assert torch.equal(out[:3], ref[:3])  # unconditional rows and the source branch untouched
    assert torch.equal(out[3, :, :, 0], ref[2, :, :, 0])
    assert torch.equal(out[3, :, :, 1], ref[2, :, :, 2])
    assert torch.equal(out[3, :, :, 2], ref[3, :, :, 2])
    controller.begin_step(9)  # past cross_replace_fraction 0.8: no edit
    late = controller.edit_attention(probs.clone(), heads, is_cross=True)
    assert torch.equal(late, probs)


def test_reweight_and_self_attention_replace():
    controller = _controller(mode="reweight", removed_token_weight=0.0)
    probs = torch.rand(4, 5, 3)  # 1 head, rows 4 = 4N with N = 1
    out = controller.edit_attention(probs.clone(), 1, is_cross=True)
    assert torch.equal(out[3, :, 1], torch.zeros(5)) and torch.equal(out[3, :, 0], probs[3, :, 0])
    self_probs = torch.rand(4, 16, 16)
    out = _controller().edit_attention(self_probs.clone(), 1, is_cross=False)
    assert torch.equal(out[3], self_probs[2]) and torch.equal(out[:3], self_probs[:3])
    unrelated = torch.rand(6, 5, 3)  # batch layout not 2N / 4N: untouched
    assert torch.equal(_controller().edit_attention(unrelated.clone(), 1, True), unrelated)


def test_local_blend_resets_target_outside_removed_token_attention():
    controller = _controller(blend_start_fraction=0.0)
    controller.latent_size = (4, 4)
    probs = torch.zeros(4, 16, 3)
    probs[..., 0] = 1.0
    probs[2, 5, :] = torch.tensor([0.0, 1.0, 0.0])  # source attends to the removed token at pixel 5
    controller.edit_attention(probs, 1, is_cross=True)
    mask = controller.blend_mask()
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0, 1, 1] == 1 and mask[0, 0, 3, 3] == 0  # pixel 5 = (1, 1), dilated by 3x3
    latents = torch.cat([torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4)])
    blended = controller.local_blend(latents)
    assert torch.equal(blended[1, :, 1, 1], torch.ones(2)) and torch.equal(blended[1, :, 3, 3], torch.zeros(2))
    assert torch.equal(blended[0], latents[0])


def test_processors_match_the_default_and_are_restored(parts):
    unet = parts["unet"].eval()
    original = dict(unet.attn_processors)
    torch.manual_seed(0)
    latents = torch.randn(3, 4, 16, 16)
    text = torch.randn(3, 48, 32)
    with torch.no_grad():
        reference = unet(latents, 10, encoder_hidden_states=text).sample
        idle = _controller()  # N = 1: a batch of 3 rows is left alone
        with prompt_to_prompt(unet, idle):
            installed = unet.attn_processors
            assert all(isinstance(p, PromptToPromptProcessor) for p in installed.values())
            ours = unet(latents, 10, encoder_hidden_states=text).sample
    assert torch.allclose(ours, reference, atol=1e-5)
    restored = unet.attn_processors
    assert restored.keys() == original.keys() and all(restored[k] is original[k] for k in original)
    with pytest.raises(RuntimeError, match="boom"), prompt_to_prompt(unet, idle):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is original[k] for k in original)


def test_edit_runs_inside_the_unet(parts):
    unet = parts["unet"].eval()
    controller = PromptToPromptController.from_prompts(parts["tokenizer"], [SOURCE], [TARGET], num_steps=10,
                                                      latent_size=(16, 16))
    latents = torch.randn(1, 4, 16, 16).repeat(4, 1, 1, 1)
    text = torch.randn(4, 48, 32)
    with torch.no_grad(), prompt_to_prompt(unet, controller):
        controller.begin_step(0)
        unet(latents, 10, encoder_hidden_states=text)
    assert controller.edited_calls > 0
    assert controller.blend_mask() is not None


def test_maker_with_prompt_to_prompt_keeps_identity_and_restores_processors(parts):
    from diffusers import StableDiffusionPipeline

    from cyclex.counterfactuals.fast_inversion import NegativePromptInversionMaker

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    original = dict(pipe.unet.attn_processors)
    plain = NegativePromptInversionMaker(pipe, num_inference_steps=3)
    controlled = plain.replace(attention_control=AttentionControlConfig(local_blend=True, blend_start_fraction=0.0))
    torch.manual_seed(0)
    images = torch.rand(1, 1, 64, 64)
    inversion = plain.invert(images, [SOURCE])
    same_prompt = controlled.edit(inversion, [SOURCE], guidances=[7.5])
    # Same prompt in both branches: borrowing the source's attention changes nothing.
    assert torch.allclose(same_prompt, plain.edit(inversion, [SOURCE], guidances=[7.5]), atol=1e-4)
    out = controlled.make(images, [SOURCE], [TARGET])
    assert out.images.shape == (1, 1, 64, 64)
    assert all(pipe.unet.attn_processors[k] is original[k] for k in original)


def test_cli_explain_with_attention_control_on_a_tiny_tailored_sd(tmp_path):
    """--attention-control reaches the maker (its settings land in the run), and is refused for ddim."""
    import json

    from cycle_fakes import write_tiny_tailored
    from PIL import Image
    from typer.testing import CliRunner

    from cyclex.cli import app

    images = tmp_path / "in"
    images.mkdir()
    for i, level in enumerate((0.3, 0.8)):
        Image.fromarray(np.full((64, 64), int(level * 255), np.uint8)).save(images / f"img{i}.png")
    tailored = write_tiny_tailored(tmp_path / "sd")
    base = ["explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
            "--images", str(images), "--steps", "2", "--guidance", "5",
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run"), "--variant", "negative-prompt",
                                      "--attention-control", "refine", "--no-local-blend"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert lines, "the bright image has Cardiomegaly: one item"
    control = lines[0]["maker_details"]["attention_control"]
    assert control["mode"] == "refine" and control["local_blend"] is False
    refused = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run2"), "--attention-control", "refine"])
    assert refused.exit_code == 1 and "--attention-control needs --variant" in refused.output
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run3"), "--variant", "direct",
                                   "--attention-control", "swap"])
    assert bad.exit_code == 1 and "mode" in bad.output
