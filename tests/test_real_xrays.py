"""Real X-rays as a user has them: files of different, large sizes, PIL images, 8-bit arrays (issue 17).

generate() and explain() accept the same inputs; every query is fitted to the tailored SD's side
keeping its aspect ratio (pad or crop, recorded), and its maps and frame come back onto the image
as it was given; a run that failed before finishing any item does not lock its folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cycle_fakes import KeywordLabeler, PaintingMaker, write_tiny_tailored
from PIL import Image
from typer.testing import CliRunner

from cyclex.adapters import CallableGenerator, GeneratorInfo
from cyclex.adapters.inputs import as_image_batch
from cyclex.cli import app
from cyclex.cycle import CyclicExplainer
from cyclex.cycle.image_fit import fit_image, plan_fit


def chest_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An 8-bit film: dark background, a bright rectangle 'body' and a brighter 'heart' disc."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width), 20, np.uint8)
    image[height // 8: -height // 8, width // 8: -width // 8] = 140
    yy, xx = np.mgrid[0:height, 0:width]
    image[((yy - height * 0.55) ** 2 + (xx - width * 0.5) ** 2) < (0.15 * min(height, width)) ** 2] = 232
    return np.clip(image + rng.integers(0, 8, image.shape), 0, 255).astype(np.uint8)


def bright_heart_reports(images: torch.Tensor) -> list[str]:
    """'cardiomegaly' when the centre of the image is bright (any size, any padding)."""
    out = []
    for image in images:
        h, w = image.shape[-2:]
        centre = image[0, int(h * 0.45):int(h * 0.65), int(w * 0.4):int(w * 0.6)].mean()
        out.append("cardiomegaly" if float(centre) > 0.6 else "normal")
    return out


# ---------------------------------------------------------------------- one input convention
def test_generate_accepts_paths_pil_arrays_and_tensors(tmp_path):
    film = chest_like(60, 50)
    path = tmp_path / "film.png"
    Image.fromarray(film).save(path)
    seen = []
    generator = CallableGenerator(lambda images: seen.append(images) or bright_heart_reports(images),
                                  GeneratorInfo(name="fake", input_size=(64, 64)))
    as_tensor = torch.from_numpy(film / 255.0).float()[None, None]
    answers = [generator.generate(x) for x in (str(path), Image.open(path), film, as_tensor, [Image.open(path)])]
    assert answers == [["cardiomegaly"]] * 5
    for images in seen:  # every kind reached the function as the same (1, 1, H, W) float tensor in [0, 1]
        assert images.dtype == torch.float32 and torch.allclose(images, as_tensor, atol=1e-6)
    # a PIL image used to fail with "values in [0, 232]"; float arrays on 0-255 are refused with the remedy
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values in \[20.000, 239.000\].*8-bit.*divide by 255"):
        generator.generate(film.astype(np.float32))
    # files of different sizes go in at the model's input size
    Image.fromarray(chest_like(80, 70, seed=1)).save(tmp_path / "other.png")
    assert generator.generate([str(path), str(tmp_path / "other.png")]) == ["cardiomegaly"] * 2
    assert seen[-1].shape == (2, 1, 64, 64)


def test_as_image_batch_scales_integer_images_and_names_bad_ones():
    sixteen = np.full((4, 4), 65535, np.uint16)
    assert float(as_image_batch(sixteen).max()) == 1.0
    assert float(as_image_batch(Image.fromarray(np.full((4, 4), 51, np.uint8))).max()) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        as_image_batch(torch.full((1, 1, 4, 4), -1.0))
    with pytest.raises(TypeError, match="integer dtype"):
        as_image_batch(torch.zeros(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="differ in size"):
        as_image_batch([np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)])


# ---------------------------------------------------------------------- fitting and bringing back
@pytest.mark.parametrize("mode", ["pad", "crop", "stretch"])
def test_maps_come_back_onto_the_original_image(mode):
    original = torch.zeros(1, 1, 197, 240)
    original[..., 80:120, 100:150] = 1.0  # a region well inside the film
    fitted, fit = fit_image(original, 64, mode)
    assert fitted.shape == (1, 1, 64, 64) and fit.original_size == (197, 240) and not fit.identity
    back = fit.to_original(fitted[0, 0].numpy())
    assert back.shape == (197, 240)
    inside = back[85:115, 105:145].mean()
    assert inside > 0.9 and back[:60].max() < 0.05  # the region is where it was, nothing elsewhere
    box = fit.box_to_fitted((100, 80, 150, 120))
    assert fitted[0, 0, box[1] + 1:box[3] - 1, box[0] + 1:box[2] - 1].mean() > 0.9


def test_pad_keeps_the_aspect_ratio_and_crop_fills_the_square():
    pad = plan_fit((1970, 2400), 512, "pad")
    assert pad.scaled_size == (420, 512) and pad.offset == (46, 0)
    crop = plan_fit((1970, 2400), 512, "crop")
    assert crop.scaled_size == (512, 624) and crop.offset == (0, 56)
    assert plan_fit((64, 64), 64, "pad").identity  # what the demo's phantoms are: untouched


def test_explain_takes_pil_images_of_different_sizes():
    explainer = CyclicExplainer(CallableGenerator(bright_heart_reports), KeywordLabeler(),
                                PaintingMaker(), frame_threshold=95, image_size=32)
    films = [Image.fromarray(chest_like(120, 100)), Image.fromarray(chest_like(90, 140, seed=2))]
    results = explainer.explain(films)
    assert [r.finding for r in results] == ["Cardiomegaly", "Cardiomegaly"]
    assert [r.query.shape for r in results] == [(32, 32), (32, 32)]
    assert [r.original.shape for r in results] == [(120, 100), (90, 140)]
    assert results[0].to_record()["fit"]["mode"] == "pad"


# ---------------------------------------------------------------------- the user's run
def test_cli_explains_large_pngs_of_different_sizes(tmp_path):
    images = tmp_path / "xrays"
    images.mkdir()
    sizes = {"p1": (246, 300), "p2": (200, 240), "p3": (250, 250)}  # 2400 x 1970-like shapes, scaled down
    for name, (h, w) in sizes.items():
        Image.fromarray(chest_like(h, w, seed=len(name))).save(images / f"{name}.png")
    tailored = write_tiny_tailored(tmp_path / "sd")
    out = tmp_path / "run"
    base = ["explain", "--generator", "python:test_real_xrays:bright_heart_reports", "--tailored", str(tailored),
            "--images", str(images), "--out", str(out), "--steps", "2", "--guidance", "1",
            "--labeler", "python:cycle_fakes:KeywordLabeler"]
    # what the user met first: images as they come fail; that failed run must not lock the folder
    failed = CliRunner().invoke(app, [*base, "--resize", "none"])
    assert failed.exit_code == 1 and "differ in size" in " ".join(failed.output.split())
    result = CliRunner().invoke(app, base)  # default: fitted to the SD's side, no --overwrite needed
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(line["image_id"] for line in lines) == ["p1", "p2", "p3"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["image_size"] == 64 and config["resize"] == "pad"
    assert json.loads((out / "explain_settings.json").read_text())["resize"] == "pad"
    for line in lines:
        h, w = sizes[line["image_id"]]
        assert line["fit"]["original_size"] == [h, w] and line["fit"]["size"] == [64, 64]
        assert Image.open(out / line["files"]["query"]).size == (64, 64)
        for key in ("difference_original", "frame_original"):
            assert Image.open(out / line["files"][key]).size == (w, h)
    # a run that finished items is still protected: other settings are refused
    refused = CliRunner().invoke(app, [*base, "--resize", "crop"])
    assert refused.exit_code == 1 and "different settings" in refused.output
