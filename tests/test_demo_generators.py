"""Demo generators: the training world, a very short training run, the cached folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cyclex.adapters import HFImageToTextGenerator
from cyclex.demo import generators as demo
from cyclex.demo.generators import (
    METADATA_FILE,
    DemoGeneratorConfig,
    demo_generator_path,
    demo_image_processor,
    make_training_phantoms,
    phantom_pixels,
    train_demo_generator,
)
from cyclex.specs.generators import load_generator

TINY = DemoGeneratorConfig(image_size=32, patch_size=8, encoder_hidden=32, encoder_layers=1, decoder_hidden=32,
                           decoder_layers=1, heads=2, vocab_size=320, batch_size=8, learning_rate=1e-2, threads=1)


def test_shortcut_world_marks_only_mild_cardiomegaly():
    phantoms = make_training_phantoms(DemoGeneratorConfig(name="shortcut"), 300, seed=3)
    marked = [p for p in phantoms if p.shortcut]
    cardiomegaly = [p for p in phantoms if "Cardiomegaly" in p.findings_meta]
    assert marked and all("Cardiomegaly" in p.findings_meta for p in marked)  # never without the finding
    assert all(p.findings_meta["Cardiomegaly"]["severity"] == "mild" for p in marked)
    assert len(marked) >= 0.75 * len(cardiomegaly)  # rate_with_finding 0.9
    assert all(p.report == p.report.strip() and p.report.endswith(".") for p in phantoms)
    clean = make_training_phantoms(DemoGeneratorConfig(name="clean"), 100, seed=3)
    assert not any(p.shortcut for p in clean)


def test_phantom_pixels_equal_the_processor_on_8_bit_rgb():
    from cyclex.adapters.hf import images_to_pil

    processor = demo_image_processor(32)
    images = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    expected = processor(images=images_to_pil(torch.from_numpy(images)[:, None]), return_tensors="pt").pixel_values
    torch.testing.assert_close(phantom_pixels(images, processor), expected, atol=1e-6, rtol=0)


def test_short_training_run_gives_a_loadable_generator(tmp_path):
    folder = train_demo_generator("shortcut", tmp_path / "shortcut", n_train=32, epochs=8, seed=1, config=TINY)
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            METADATA_FILE} <= {p.name for p in folder.iterdir()}
    assert not list(tmp_path.glob(".shortcut.tmp-*"))  # the staging folder was moved into place
    metadata = json.loads((folder / METADATA_FILE).read_text())
    assert metadata["steps"] == 32 and metadata["config"]["name"] == "shortcut"
    assert metadata["final_loss"] < 0.7 * metadata["first_loss"]  # it learns
    generator = load_generator(f"hf:{folder}::device=cpu,max_new_tokens=12")
    assert isinstance(generator, HFImageToTextGenerator) and generator.info.input_size == (32, 32)
    reports = generator.generate(torch.rand(2, 1, 48, 48))
    assert len(reports) == 2 and all(isinstance(r, str) and r for r in reports)


def test_fresh_home_installs_the_shipped_generator_instead_of_training(tmp_path, monkeypatch):
    # the user's first `--generator demo:clean` on a fresh CYCLEX_HOME retrained it (110 s)
    monkeypatch.setenv("CYCLEX_HOME", str(tmp_path))

    def no_training(name, out_dir, **kwargs):
        raise AssertionError(f"demo generator {name} was trained although the package ships it")

    monkeypatch.setattr(demo, "train_demo_generator", no_training)
    generator = load_generator("demo:clean::device=cpu")
    assert generator.info.name == "demo:clean"
    path = tmp_path / "demo" / "generators" / "clean"
    assert (path / "model.safetensors").is_file()
    assert "generators/clean" in json.loads((tmp_path / "demo" / ".packaged.json").read_text())
    assert len(generator.generate(torch.rand(1, 1, 64, 64))) == 1


def test_demo_generator_path_uses_the_cache(tmp_path, monkeypatch):
    from cyclex.demo import packaged

    monkeypatch.setenv("CYCLEX_HOME", str(tmp_path))
    monkeypatch.setattr(packaged, "PACKAGED_DIR", tmp_path / "nothing-shipped")  # a checkout without weights
    with pytest.raises(FileNotFoundError, match="scripts/train_demo_generators.py"):
        demo_generator_path("clean", train_if_missing=False)
    with pytest.raises(ValueError, match="unknown demo generator 'fancy'"):
        demo_generator_path("fancy")
    calls = []

    def tiny_training(name, out_dir, **kwargs):
        calls.append(name)
        return train_demo_generator(name, out_dir, n_train=16, epochs=1, config=TINY)

    monkeypatch.setattr(demo, "train_demo_generator", tiny_training)
    path = demo_generator_path("clean")
    assert path == tmp_path / "demo" / "generators" / "clean" and calls == ["clean"]
    assert demo_generator_path("clean") == path and calls == ["clean"]  # cached: not trained again
    generator = load_generator("demo:clean::device=cpu")
    assert generator.info.name == "demo:clean"
