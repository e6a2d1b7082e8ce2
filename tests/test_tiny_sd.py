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


def _token_embeddings(config: TinySDConfig, text: str) -> dict[str, torch.Tensor]:
    parts = tiny_sd_pipeline(config)
    ids = parts.tokenizer(text).input_ids
    with torch.no_grad():
        hidden = parts.text_encoder(torch.tensor([ids]))[0][0]
    return {token: hidden[i] for i, token in enumerate(parts.tokenizer.convert_ids_to_tokens(ids))}


def test_bag_of_tokens_text_encoder_keeps_other_findings_when_one_is_removed():
    source = StructuredPrompt(("Consolidation", "Pneumothorax", "Fracture")).text
    target = StructuredPrompt(("Pneumothorax", "Fracture")).text
    bag = TinySDConfig(text_layers=0, text_position_embeddings=False)
    before, after = _token_embeddings(bag, source), _token_embeddings(bag, target)
    for token in ("pneumothorax</w>", "fracture</w>"):
        torch.testing.assert_close(before[token], after[token])
    # the default transformer encoder mixes positions and predecessors: the same tokens move
    mixed_before, mixed_after = _token_embeddings(TinySDConfig(), source), _token_embeddings(TinySDConfig(), target)
    assert not torch.allclose(mixed_before["fracture</w>"], mixed_after["fracture</w>"], atol=1e-3)
