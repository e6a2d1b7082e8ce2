"""CallableGenerator, HFImageToTextGenerator (tiny models built from configs) and load_generator."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from cyclex.adapters import (
    CallableGenerator,
    GeneratorError,
    GeneratorInfo,
    HFImageToTextGenerator,
    ReportGenerator,
)
from cyclex.demo.generators import (
    DemoGeneratorConfig,
    build_demo_model,
    demo_image_processor,
    train_report_tokenizer,
)
from cyclex.specs.generators import GeneratorSpecError, load_generator, parse_options

REPORTS = ["Heart size is normal. No pleural effusion.", "Cardiomegaly. Small left pleural effusion.",
           "Describe the findings. Possible pneumothorax."] * 4


# ---------------------------------------------------------------------- CallableGenerator
def mean_intensity_reports(images: torch.Tensor) -> list[str]:
    return ["bright" if float(image.mean()) > 0.5 else "dark" for image in images]


def test_callable_generator_batches_and_checks():
    generator = CallableGenerator(mean_intensity_reports, batch_size=2)
    images = torch.zeros(5, 1, 8, 8)
    images[[1, 4]] = 1.0
    assert generator.generate(images) == ["dark", "bright", "dark", "dark", "bright"]
    assert isinstance(generator, ReportGenerator)
    assert generator.info.name.endswith("mean_intensity_reports")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        generator.generate(images * 2)
    with pytest.raises(ValueError, match="shape"):
        generator.generate(torch.zeros(2, 3, 8, 8))


def test_callable_generator_that_raises_names_generator_and_batch():
    def flaky(images):
        if float(images.max()) > 0.5:
            raise RuntimeError("CUDA out of memory")
        return ["ok"] * len(images)

    generator = CallableGenerator(flaky, GeneratorInfo(name="flaky-model"), batch_size=2)
    images = torch.zeros(5, 1, 8, 8)
    images[3] = 1.0
    with pytest.raises(GeneratorError, match=r"flaky-model raised RuntimeError on batch 1 \(images 2..3 of 5") as info:
        generator.generate(images)
    assert "CUDA out of memory" in str(info.value)


@pytest.mark.parametrize("answer, message", [
    (lambda n: [1] * n, "non-string reports at positions"),
    (lambda n: ["x"] * (n + 1), "returned 3 reports for 2 images"),
    (lambda n: "one string", "returned str, expected a list"),
])
def test_callable_generator_bad_answers(answer, message):
    generator = CallableGenerator(lambda images: answer(len(images)), GeneratorInfo(name="bad"))
    with pytest.raises(GeneratorError, match=message) as info:
        generator.generate(torch.zeros(2, 1, 4, 4))
    assert "bad" in str(info.value) and "batch 0" in str(info.value)


# ---------------------------------------------------------------------- HF: VisionEncoderDecoder
@pytest.fixture(scope="module")
def tiny_ved_folder(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = train_report_tokenizer(REPORTS, vocab_size=300)
    config = DemoGeneratorConfig(image_size=32, patch_size=8, encoder_hidden=32, encoder_layers=1,
                                 decoder_hidden=32, decoder_layers=1, heads=2)
    model = build_demo_model(config, tokenizer, max_report_tokens=8)
    folder = tmp_path_factory.mktemp("tiny_ved")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    demo_image_processor(32).save_pretrained(folder)
    return folder


def test_hf_vision_encoder_decoder_matches_direct_generate(tiny_ved_folder):
    generator = load_generator(f"hf:{tiny_ved_folder}::max_new_tokens=6,batch_size=2,device=cpu")
    assert isinstance(generator, HFImageToTextGenerator)
    assert generator.info.input_size == (32, 32) and generator.info.mean == (0.5, 0.5, 0.5)
    torch.manual_seed(1)
    images = torch.rand(3, 1, 40, 40)
    reports = generator.generate(images)
    assert len(reports) == 3 and all(isinstance(r, str) for r in reports)
    # the same answer as calling the model by hand on 8-bit RGB pixel values
    from cyclex.adapters.hf import images_to_pil

    pixel_values = generator.image_processor(images=images_to_pil(images), return_tensors="pt").pixel_values
    expected_ids = generator.model.generate(pixel_values=pixel_values, max_new_tokens=6, do_sample=False)
    expected = [t.strip() for t in generator.tokenizer.batch_decode(expected_ids, skip_special_tokens=True)]
    assert reports == expected
    # multi-view studies: the first view is used
    studies = torch.stack([images, torch.zeros_like(images)], dim=1)
    assert generator.generate(studies) == reports


@pytest.fixture(scope="module")
def beam_ved_folder(tmp_path_factory, tiny_ved_folder):
    """The tiny captioner (16 decoder positions) whose generation_config.json asks for 2 beams, 12 tokens."""
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path_factory.mktemp("beam_ved")
    shutil.copytree(tiny_ved_folder, folder, dirs_exist_ok=True)
    config = GenerationConfig.from_pretrained(folder)
    config.num_beams, config.max_new_tokens = 2, 12
    config.save_pretrained(folder)
    return folder


def _direct_reports(generator, images, **generation):
    """What the model says when called by hand with its own generation_config plus `generation`."""
    import copy

    from cyclex.adapters.hf import images_to_pil

    config = copy.deepcopy(generator.model.generation_config)
    for key, value in generation.items():
        setattr(config, key, value)
    pixel_values = generator.image_processor(images=images_to_pil(images), return_tensors="pt").pixel_values
    ids = generator.model.generate(pixel_values=pixel_values, generation_config=config)
    return ids, [t.strip() for t in generator.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def test_hf_honours_the_models_generation_config(beam_ved_folder):
    # the user's model: its own generation_config.json (beams, length) used to be replaced by
    # max_new_tokens=96, num_beams=1, which ran a 64-position GPT-2 into IndexError mid-batch
    generator = load_generator(f"hf:{beam_ved_folder}::device=cpu,batch_size=2")
    torch.manual_seed(3)
    images = torch.rand(3, 1, 32, 32)
    ids, expected = _direct_reports(generator, images)
    assert ids.shape[1] == 13  # the untrained decoder never stops early: all 12 tokens, within 16 positions
    assert generator.generate(images) == expected
    assert generator.generation_config.num_beams == 2 and generator.generation_config.max_new_tokens == 12
    # spec options override single fields, the rest stays the model's
    greedy = load_generator(f"hf:{beam_ved_folder}::device=cpu,num_beams=1,max_new_tokens=4")
    assert greedy.generation_config.num_beams == 1 and greedy.generation_config.max_new_tokens == 4
    assert greedy.generate(images) == _direct_reports(greedy, images, num_beams=1, max_new_tokens=4)[1]


def test_hf_never_generates_past_the_decoders_positions(beam_ved_folder, caplog):
    generator = load_generator(f"hf:{beam_ved_folder}::device=cpu,max_new_tokens=96")
    images = torch.rand(2, 1, 32, 32)
    with pytest.raises(IndexError):  # what the model does when asked by hand for 96 tokens
        _direct_reports(generator, images, max_new_tokens=96)
    with caplog.at_level("WARNING", logger="cyclex.adapters.hf"):
        reports = generator.generate(images)
        generator.generate(images)
    assert reports == _direct_reports(generator, images, max_new_tokens=15)[1]  # 1 start token + 15 = 16 positions
    capped = [r for r in caplog.records if "past the decoder's 16 positions" in r.getMessage()]
    assert len(capped) == 1 and "at most 15 new tokens" in capped[0].getMessage()  # said once, not per batch


def test_hf_spec_options_are_all_documented():
    from cyclex.specs.generators import SPEC_OPTIONS, spec_options_help

    accepted = {"prompt", "device", "batch_size"} | _generation_option_names()
    assert set(SPEC_OPTIONS["hf"]) == accepted
    help_text = spec_options_help()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for kind, options in SPEC_OPTIONS.items():
        for key in options:
            if key != "ANY_OPTION":
                assert key in help_text, (kind, key)
                assert f"`{key}`" in readme, f"README does not document the {kind} option {key}"


def _generation_option_names() -> set[str]:
    from cyclex.specs import generators

    return generators._HF_GENERATION_INT | generators._HF_GENERATION_FLOAT | generators._HF_GENERATION_BOOL


def test_hf_generator_wraps_model_errors(tiny_ved_folder):
    generator = HFImageToTextGenerator.from_pretrained(tiny_ved_folder, device="cpu",
                                                       generation_kwargs={"max_new_tokens": 2, "num_beams": 0})
    with pytest.raises(GeneratorError, match=r"hf:.*tiny_ved.* on batch 0"):
        generator.generate(torch.rand(1, 1, 32, 32))


def test_hf_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(GeneratorError, match="cannot load a transformers image-to-text model from"):
        HFImageToTextGenerator.from_pretrained(tmp_path / "nothing-here")


# ---------------------------------------------------------------------- HF: instruction model (tiny LLaVA)
@pytest.fixture(scope="module")
def tiny_llava_folder(tmp_path_factory):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    tokenizer = train_report_tokenizer(REPORTS, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    folder = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_hf_instruction_model_returns_only_new_tokens(tiny_llava_folder):
    prompt = "Describe the findings."
    generator = load_generator(f"hf:{tiny_llava_folder}::max_new_tokens=5,device=cpu,prompt={prompt}")
    assert generator.prompt == prompt and not generator.is_encoder_decoder_captioner
    assert generator._prompt_text() == "<image>\n" + prompt  # no chat template: image token prepended
    torch.manual_seed(2)
    images = torch.rand(2, 1, 48, 48)
    reports = generator.generate(images)
    from cyclex.adapters.hf import images_to_pil

    inputs = generator.processor(images=images_to_pil(images), text=["<image>\n" + prompt] * 2, return_tensors="pt")
    full = generator.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert full.shape[1] > prompt_length  # the model echoes the prompt: the adapter must cut it
    new_only = generator.tokenizer.batch_decode(full[:, prompt_length:], skip_special_tokens=True)
    assert reports == [text.strip() for text in new_only]


def test_hf_instruction_prompt_uses_chat_template(tiny_llava_folder):
    generator = HFImageToTextGenerator.from_pretrained(tiny_llava_folder, prompt="Describe the findings",
                                                       device="cpu", generation_kwargs={"max_new_tokens": 2})
    generator.processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    assert generator._prompt_text() == "USER: <image>Describe the findings ASSISTANT:"
    assert len(generator.generate(torch.rand(1, 1, 32, 32))) == 1
    assert generator._strip_prompt("Describe the findings Heart normal.") == "Heart normal."


# ---------------------------------------------------------------------- registry
def test_parse_options_keeps_commas_in_prompt():
    options = parse_options("num_beams=3,prompt=Describe the findings, briefly.,max_new_tokens=20", spec="x")
    assert options == {"num_beams": "3", "prompt": "Describe the findings, briefly.", "max_new_tokens": "20"}


def test_python_spec_wraps_a_function(tmp_path, monkeypatch):
    (tmp_path / "my_reporter.py").write_text(textwrap.dedent("""
        def describe(images):
            return ["No acute findings."] * len(images)

        def broken(images):
            return [None] * len(images)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    generator = load_generator("python:my_reporter:describe")
    assert generator.generate(torch.zeros(2, 1, 4, 4)) == ["No acute findings."] * 2
    with pytest.raises(GeneratorError, match="python:my_reporter:broken returned non-string"):
        load_generator("python:my_reporter:broken").generate(torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "expected KIND"),
    ("foo:bar", "unknown kind 'foo'"),
    ("python:no_such_module_xyz:f", "cannot import module"),
    ("python:os:no_such_function", "has no attribute"),
    ("r2gen:only_repo", "expected r2gen:REPO::CHECKPOINT::ANNOTATION"),
    ("demo:fancy", "unknown demo generator 'fancy'"),
    ("hf:/tmp::beams", "is not key=value"),
])
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(GeneratorSpecError, match=message):
        load_generator(spec)


# ---------------------------------------------------------------------- CLI
def test_cli_generate_skips_bad_files_and_keeps_the_rest(tmp_path, monkeypatch):
    import csv

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from cyclex.cli import app

    (tmp_path / "cli_reporter.py").write_text(
        "def describe(images):\n    return ['bright' if float(i.mean()) > 0.5 else 'dark' for i in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    Image.fromarray(np.full((20, 30), 250, np.uint8)).save(tmp_path / "bright.png")
    Image.fromarray(np.full((40, 40), 5, np.uint8)).save(tmp_path / "dark.png")
    (tmp_path / "empty.png").write_bytes(b"")
    truncated = (tmp_path / "bright.png").read_bytes()[:40]
    (tmp_path / "truncated.png").write_bytes(truncated)
    files = [str(tmp_path / name) for name in ("bright.png", "empty.png", "dark.png", "truncated.png")]
    out = tmp_path / "reports.csv"
    result = CliRunner().invoke(app, ["generate", "python:cli_reporter:describe", *files, "--out", str(out)])
    assert result.exit_code == 1
    assert "empty.png" in result.output and "truncated.png" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [(row["image"].rsplit("/", 1)[-1], row["report"]) for row in rows] == [("bright.png", "bright"),
                                                                                   ("dark.png", "dark")]
