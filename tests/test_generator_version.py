"""Resume keyed on the generator's weights, not only its spec (issue 18, defect 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cycle_fakes import query, write_tiny_tailored
from PIL import Image
from typer.testing import CliRunner

from cyclex.cli import app
from cyclex.specs.generator_fingerprint import generator_version, weights_fingerprint


def _hf_folder(folder, weights=b"\x00" * 64):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "vision-encoder-decoder"}')
    (folder / "generation_config.json").write_text('{"num_beams": 1}')
    (folder / "README.md").write_text("not a weight file")
    return folder


def test_hf_folder_fingerprint_follows_weights_and_configs_only(tmp_path):
    folder = _hf_folder(tmp_path / "model")
    first = weights_fingerprint(f"hf:{folder}")
    assert first.startswith("sha256:") and first == weights_fingerprint(f"hf:{folder}::num_beams=3")
    (folder / "README.md").write_text("edited")
    assert weights_fingerprint(f"hf:{folder}") == first  # not a weight or config file
    (folder / "model.safetensors").write_bytes(b"\x01" * 64)  # retrained in place: same spec, new weights
    retrained = weights_fingerprint(f"hf:{folder}")
    assert retrained != first
    (folder / "generation_config.json").write_text('{"num_beams": 4}')
    assert weights_fingerprint(f"hf:{folder}") != retrained
    assert weights_fingerprint("hf:org/some-hub-model") is None
    assert weights_fingerprint("python:cycle_fakes:brightness_reports") is None


def test_r2gen_fingerprint_covers_checkpoint_and_annotation(tmp_path):
    checkpoint, annotation = tmp_path / "model_best.pth", tmp_path / "annotation.json"
    checkpoint.write_bytes(b"weights")
    annotation.write_text("{}")
    spec = f"r2gen:{tmp_path}::{checkpoint}::{annotation}::beam_size=3"
    first = weights_fingerprint(spec)
    annotation.write_text('{"train": []}')
    assert first.startswith("sha256:") and weights_fingerprint(spec) != first
    assert weights_fingerprint(f"r2gen:{tmp_path}::{tmp_path / 'missing.pth'}::{annotation}") is None
    assert generator_version(spec, "v2") == "v2"
    with pytest.raises(ValueError, match="--generator-version must be a non-empty"):
        generator_version(spec, "  ")


def test_explain_refuses_to_resume_with_another_generator_version(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for image_id, heart in (("a", 0.9), ("b", 0.9)):
        Image.fromarray(np.uint8(query(heart)[0].numpy() * 255 + 0.5)).save(images / f"{image_id}.png")
    tailored = write_tiny_tailored(tmp_path / "sd")
    out = tmp_path / "run"
    args = ["explain", "--generator", "python:cycle_fakes:brightness_reports", "--tailored", str(tailored),
            "--images", str(images), "--out", str(out), "--steps", "2", "--labeler",
            "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--generator-version", "v1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run_config.json").read_text())["generator_version"] == "v1"
    # the function was fixed: same spec, another version -> the old results are not resumed
    refused = CliRunner().invoke(app, [*args, "--generator-version", "v2"])
    assert refused.exit_code == 1 and "generator_version" in refused.output and "--overwrite" in refused.output
    same = CliRunner().invoke(app, [*args, "--generator-version", "v1"])
    assert same.exit_code == 0, same.output
    redone = CliRunner().invoke(app, [*args, "--generator-version", "v2", "--overwrite"])
    assert redone.exit_code == 0, redone.output
    assert json.loads((out / "run_config.json").read_text())["generator_version"] == "v2"
