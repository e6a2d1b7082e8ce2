"""Tailored SD training: only the UNet learns, resume is exact, the folder reloads offline, bad bases fail clearly."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from _tailored_helpers import save_tiny_base, write_manifest

from cyclex.tailored_training import (
    BaseModelError,
    TailoredTrainingConfig,
    load_tailored_pipeline,
    read_tailored_metadata,
    train_tailored,
)

CONFIG = TailoredTrainingConfig(
    max_train_steps=5, checkpointing_steps=2, resolution=32, train_batch_size=4, learning_rate=1e-3,
    lr_scheduler="linear", lr_warmup_steps=2, report_to="none", validation_steps=2, validation_fraction=0.2,
    num_inversion_steps=5, seed=3,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "sd")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=12)


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_changes_only_the_unet(base, manifest, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train_tailored(manifest, base, tmp_path / "out", CONFIG, generator_spec="demo:clean")
    assert result.global_step == 5
    assert result.checkpoints == ["checkpoints/checkpoint-000002", "checkpoints/checkpoint-000004",
                                  "checkpoints/checkpoint-000005"]
    before = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)
    after = load_tailored_pipeline(tmp_path / "out", checkpoint="final")
    changed = [k for k, v in _state(before.unet).items() if not torch.equal(v, after.unet.state_dict()[k])]
    assert len(changed) > 0.5 * len(before.unet.state_dict())
    for part in ("vae", "text_encoder"):
        ref, new = _state(getattr(before, part)), getattr(after, part).state_dict()
        assert all(torch.equal(v, new[k]) for k, v in ref.items()), f"{part} changed"
    # The folder reloads offline with the plain diffusers call, safetensors inside.
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert torch.equal(plain.unet.conv_out.weight, after.unet.conv_out.weight)
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-000002" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = read_tailored_metadata(tmp_path / "out")
    assert meta["generator"] == "demo:clean" and meta["sample_size"] == 32 and len(meta["vocabulary"]) == 13
    saved = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["p_uncond"] == 0.1


def test_resume_matches_uninterrupted_run(base, manifest, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = dataclasses.replace(CONFIG, max_train_steps=7, checkpointing_steps=3, checkpoints_total_limit=2)
    out = tmp_path / "run"
    train_tailored(manifest, base, out, cfg)
    # The kept limit deletes the oldest: 3 is gone, 6 and the final 7 remain.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000006", "checkpoint-000007"]
    uninterrupted = _state(UNet2DConditionModel.from_pretrained(out / "checkpoints" / "checkpoint-000007", subfolder="unet"))

    # Crash after step 3: keep only that checkpoint, then run again; 10 train images / batch 4 -> the
    # resumed epoch starts mid-way (skip_first_batches), and the lr is mid-schedule.
    resumed_out = tmp_path / "resumed"
    cfg_short = dataclasses.replace(cfg, checkpoints_total_limit=None)
    train_tailored(manifest, base, resumed_out, cfg_short)
    for later in ("checkpoint-000006", "checkpoint-000007"):
        shutil.rmtree(resumed_out / "checkpoints" / later)
    result = train_tailored(manifest, base, resumed_out, cfg_short)
    assert result.global_step == 7 and result.checkpoints == ["checkpoints/checkpoint-000006",
                                                              "checkpoints/checkpoint-000007"]
    resumed = UNet2DConditionModel.from_pretrained(resumed_out / "checkpoints" / "checkpoint-000007", subfolder="unet")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)


def test_base_folder_missing_parts_is_a_clear_error(base, manifest, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(BaseModelError, match=r"missing parts: vae/.*tokenizer/"):
        train_tailored(manifest, broken, tmp_path / "out", CONFIG)


def test_empty_manifest_is_a_clear_error(base, tmp_path):
    from cyclex.tailored_training import EmptyDatasetError

    empty = tmp_path / "manifest.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyDatasetError, match="no rows"):
        train_tailored(empty, base, tmp_path / "out", CONFIG)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="p_uncond"):
        TailoredTrainingConfig(p_uncond=1.5)
    with pytest.raises(ValueError, match="mixed_precision"):
        TailoredTrainingConfig(mixed_precision="fp8")
    assert TailoredTrainingConfig().train_batch_size == 8 and TailoredTrainingConfig().learning_rate == 5e-5


def test_ema_accumulation_checkpointing_and_image_batches(base, manifest, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = dataclasses.replace(CONFIG, max_train_steps=2, checkpointing_steps=2, use_ema=True, ema_decay=0.5,
                              gradient_checkpointing=True, precompute_latents=False, gradient_accumulation_steps=2)
    result = train_tailored(manifest, base, tmp_path / "out", cfg)
    assert result.global_step == 2
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-000002"
    ema = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet")  # deployable (EMA) weights
    raw = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet_train")  # what the optimizer trains
    start = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    w_ema, w_raw, w_start = ema.conv_in.weight, raw.conv_in.weight, start.conv_in.weight
    assert not torch.equal(w_ema, w_raw) and not torch.equal(w_raw, w_start)
    # EMA lies between the start and the trained weights (decay 0.5, warm-up-adjusted by diffusers)
    assert float((w_ema - w_start).norm()) < float((w_raw - w_start).norm())
    folder_unet = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    assert torch.equal(folder_unet.conv_in.weight, w_ema)


# A training run that is killed (SIGKILL, no clean-up runs) inside the checkpoint save of step 6,
# after the UNet hook wrote unet/ and before accelerate wrote optimizer.bin (issue 18, defect 3).
KILLED_IN_SAVE = textwrap.dedent("""
    import dataclasses, json, os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the test process (conftest): same float rounding, comparable weights
    import accelerate.accelerator
    from cyclex.tailored_training import TailoredTrainingConfig, train_tailored

    real_save = accelerate.accelerator.save_accelerator_state

    def save_then_die_at_step_6(output_dir, *args, **kwargs):
        if output_dir.rstrip("/").split("checkpoint-")[-1].startswith("000006"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(output_dir, *args, **kwargs)

    accelerate.accelerator.save_accelerator_state = save_then_die_at_step_6
    manifest, base, out, config = sys.argv[1:5]
    train_tailored(manifest, base, out, TailoredTrainingConfig(**json.loads(config)))
""")


def _unet_state(checkpoint) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return _state(UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet"))


def test_a_kill_inside_a_checkpoint_save_does_not_block_resume(base, manifest, tmp_path, caplog):
    cfg = dataclasses.replace(CONFIG, max_train_steps=7, checkpointing_steps=3, checkpoints_total_limit=1)
    reference = tmp_path / "reference"
    train_tailored(manifest, base, reference, cfg)
    uninterrupted = _unet_state(reference / "checkpoints" / "checkpoint-000007")

    out = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, str(manifest), str(base), str(out),
                            json.dumps(dataclasses.asdict(cfg))], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    checkpoints = out / "checkpoints"
    # the half-saved step 6 is not visible as a checkpoint, and step 3 was not pruned for it
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000003", "checkpoint-000006.partial"]
    assert (checkpoints / "checkpoint-000006.partial" / "unet").is_dir()
    assert not (checkpoints / "checkpoint-000006.partial" / "optimizer.bin").exists()

    with caplog.at_level(logging.WARNING, logger="cyclex.tailored_training.train"):
        result = train_tailored(manifest, base, out, cfg)
    assert "checkpoint-000006.partial" in caplog.text and result.global_step == 7
    assert result.checkpoints == ["checkpoints/checkpoint-000006", "checkpoints/checkpoint-000007"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000007"]
    resumed = _unet_state(checkpoints / "checkpoint-000007")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


def test_an_incomplete_checkpoint_of_an_earlier_cyclex_is_skipped_with_a_warning(base, manifest, tmp_path, caplog):
    cfg = dataclasses.replace(CONFIG, max_train_steps=7, checkpointing_steps=3)
    out = tmp_path / "run"
    train_tailored(manifest, base, out, cfg)
    uninterrupted = _unet_state(out / "checkpoints" / "checkpoint-000007")
    # as a kill inside save_state left step 6 before checkpoints were renamed into place
    shutil.rmtree(out / "checkpoints" / "checkpoint-000007")
    (out / "checkpoints" / "checkpoint-000006" / "optimizer.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-000006 is incomplete \(missing optimizer.bin"):
        train_tailored(manifest, base, out, dataclasses.replace(cfg, resume_from_checkpoint="checkpoint-000006"))

    with caplog.at_level(logging.WARNING, logger="cyclex.tailored_training.train"):
        result = train_tailored(manifest, base, out, cfg)
    assert "skipping incomplete checkpoint" in caplog.text and "optimizer.bin" in caplog.text
    assert result.global_step == 7 and result.checkpoints == ["checkpoints/checkpoint-000006",
                                                              "checkpoints/checkpoint-000007"]
    assert (out / "checkpoints" / "checkpoint-000006" / "optimizer.bin").is_file()  # saved again, whole
    resumed = _unet_state(out / "checkpoints" / "checkpoint-000007")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)
