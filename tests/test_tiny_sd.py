import torch
from diffusers import StableDiffusionPipeline

from cyclex.demo.tiny_sd import TinySDConfig, build_clip_tokenizer, tiny_sd_pipeline
from cyclex.findings import ABNORMALITIES, StructuredPrompt


def test_tokenizer_keeps_every_finding_word_whole():
    tokenizer = build_clip_tokenizer(model_max_length=48)
    ids = tokenizer(StructuredPrompt(ABNORMALITIES).text).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert "cardiomegaly</w>" in tokens and "pneumothorax</w>" in tokens
    assert len(ids) <= 48  # the longest structured prompt fits the tiny text encoder


def test_tiny_pipeline_round_trips_through_a_folder(tmp_path):
    pipe = tiny_sd_pipeline(TinySDConfig(seed=3))
    pipe.save_pretrained(tmp_path / "sd")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    again.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, height=64, width=64, output_type="pt")
    a = pipe("The lung with no abnormalities", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = again("The lung with no abnormalities", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 3, 64, 64)
    torch.testing.assert_close(a, b)
