"""`cyclex train-tailored`: data set from the generator, training, selection, in one command."""

from __future__ import annotations

import json

import pytest
import torch
from _tailored_helpers import save_tiny_base, write_images
from typer.testing import CliRunner

from cyclex.cli import app


def test_train_tailored_command_builds_trains_and_selects(tmp_path):
    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    write_images(tmp_path / "images", 10, size=32)
    out = tmp_path / "tailored"
    result = CliRunner().invoke(app, [
        "train-tailored", "--generator", "python:_tailored_helpers:disc_reports", "--images", str(tmp_path / "images"),
        "--base", str(base), "--out", str(out), "--max-steps", "2", "--resolution", "32", "--batch-size", "4",
        "--checkpointing-steps", "1", "--inversion-steps", "2",
    ])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "dataset" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert {r["prompt"] for r in rows} <= {"The lung with abnormalities Cardiomegaly", "The lung with no abnormalities"}
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection["metrics"]) == {"checkpoints/checkpoint-000001", "checkpoints/checkpoint-000002"}
    assert json.loads((out / "cyclex_tailored.json").read_text())["generator"] == "python:_tailored_helpers:disc_reports"


def test_train_tailored_command_reports_a_broken_base(tmp_path):
    (tmp_path / "base" / "unet").mkdir(parents=True)
    write_images(tmp_path / "images", 2, size=16)
    result = CliRunner().invoke(app, [
        "train-tailored", "--generator", "python:_tailored_helpers:disc_reports", "--images", str(tmp_path / "images"),
        "--base", str(tmp_path / "base"), "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "is missing parts: unet/" in text and "vae/ (needs config.json)" in text


def _train(tmp_path, base, *extra):
    return CliRunner().invoke(app, [
        "train-tailored", "--images", str(tmp_path / "images"), "--base", str(base), "--out", str(tmp_path / "tailored"),
        "--resolution", "32", "--batch-size", "4", "--checkpointing-steps", "1", "--no-select", *extra])


def test_train_tailored_refuses_another_run_in_its_out_unless_overwrite(tmp_path):
    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    write_images(tmp_path / "images", 6, size=32)
    first = _train(tmp_path, base, "--generator", "python:_tailored_helpers:disc_reports", "--max-steps", "2")
    assert first.exit_code == 0, first.output
    out = tmp_path / "tailored"
    # another step count: resuming would continue the 2-step run's lr schedule as if it were a 3-step one
    longer = _train(tmp_path, base, "--generator", "python:_tailored_helpers:disc_reports", "--max-steps", "3")
    text = " ".join(longer.output.split())
    assert longer.exit_code == 2 and "config.max_train_steps (2 -> 3)" in text and "--overwrite" in text
    # another generator: its reports are other prompts, and the cached ones must not be reused
    other = _train(tmp_path, base, "--generator", "python:_tailored_helpers:dark_reports", "--max-steps", "2")
    text = " ".join(other.output.split())
    assert other.exit_code == 2 and "generator ('python:_tailored_helpers:disc_reports' -> " in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    # --overwrite starts over: the other generator's reports, a fresh 3-step run
    again = _train(tmp_path, base, "--generator", "python:_tailored_helpers:dark_reports", "--max-steps", "3",
                   "--overwrite")
    assert again.exit_code == 0, again.output
    rows = [json.loads(line) for line in (out / "dataset" / "manifest.jsonl").read_text().splitlines()]
    assert {r["report"] for r in rows} == {"No acute cardiopulmonary process."}
    assert json.loads((out / "training_run.json").read_text())["generator"] == "python:_tailored_helpers:dark_reports"
    assert json.loads((out / "cyclex_tailored.json").read_text())["global_step"] == 3
    # the same command again resumes (nothing to do: all 3 steps are there)
    same = _train(tmp_path, base, "--generator", "python:_tailored_helpers:dark_reports", "--max-steps", "3")
    assert same.exit_code == 0 and "trained 3 steps" in same.output


def test_warm_up_is_scaled_to_the_run_and_a_flag(tmp_path):
    from cyclex.tailored_training import TailoredTrainingConfig

    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    write_images(tmp_path / "images", 6, size=32)
    result = _train(tmp_path, base, "--generator", "python:_tailored_helpers:disc_reports", "--max-steps", "3",
                    "--learning-rate", "1e-3")
    assert result.exit_code == 0, result.output
    # the user's short run used to stay at 3/500 of its learning rate: now it trains at the rate it asked for
    state = torch.load(tmp_path / "tailored" / "checkpoints" / "checkpoint-000003" / "scheduler.bin", weights_only=True)
    assert state["_last_lr"] == [pytest.approx(1e-3)]
    flagged = CliRunner().invoke(app, [
        "train-tailored", "--images", str(tmp_path / "images"), "--base", str(base), "--out", str(tmp_path / "w"),
        "--generator", "python:_tailored_helpers:disc_reports", "--resolution", "32", "--batch-size", "4",
        "--max-steps", "2", "--warmup-steps", "4", "--no-select"])
    assert flagged.exit_code == 0, flagged.output
    assert json.loads((tmp_path / "w" / "training_config.json").read_text())["lr_warmup_steps"] == 4
    assert TailoredTrainingConfig().resolved_warmup_steps() == 500  # 100k steps: diffusers' 500
    assert TailoredTrainingConfig(max_train_steps=40).resolved_warmup_steps() == 2
    assert TailoredTrainingConfig(max_train_steps=40, lr_warmup_steps=0).resolved_warmup_steps() == 0


def test_a_pndm_base_leaves_no_foreign_scheduler_keys_behind(tmp_path):
    import logging

    from diffusers import PNDMScheduler
    from diffusers.utils import logging as diffusers_logging

    from cyclex.counterfactuals.diffusion import LatentDiffusion
    from cyclex.tailored_training import load_tailored_pipeline

    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False).save_pretrained(base / "scheduler")
    write_images(tmp_path / "images", 6, size=32)
    result = _train(tmp_path, base, "--generator", "python:_tailored_helpers:disc_reports", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "tailored" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler" and "skip_prk_steps" not in saved
    # a folder saved before the fix still carries the key: loading cleans it, so no maker warns
    saved["skip_prk_steps"] = True
    (tmp_path / "tailored" / "scheduler" / "scheduler_config.json").write_text(json.dumps(saved))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        pipe = load_tailored_pipeline(tmp_path / "tailored", checkpoint="final")
        for _ in range(3):  # one per maker the search builds
            LatentDiffusion(pipe, num_inference_steps=2)
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert not [m for m in messages if "were passed to" in m], messages


def test_train_tailored_latent_cache_flag_trains_from_the_cache(tmp_path):
    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    write_images(tmp_path / "images", 6, size=32)
    cache = tmp_path / "latents"
    result = _train(tmp_path, base, "--generator", "python:_tailored_helpers:disc_reports", "--max-steps", "1",
                    "--latent-cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "tailored" / "training_config.json").read_text())
    assert config["latent_cache_dir"] == str(cache) and config["precompute_latents"] is True
    assert sorted(p.name for p in cache.glob("latents-*.safetensors")), list(cache.iterdir())
