"""Checkpoint selection by DDIM reconstruction, on a case whose answer is known."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _tailored_helpers import save_tiny_base, write_manifest
from skimage.metrics import peak_signal_noise_ratio

from cyclex.tailored_training import (
    TailoredTrainingConfig,
    load_tailored_pipeline,
    reconstruction_errors,
    select_checkpoints,
    train_tailored,
)
from cyclex.tailored_training.dataset import load_gray_image


def test_reconstruction_errors_match_hand_and_skimage():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 0.4  # one pixel off by 0.4: MSE 0.01, L1 0.025, RMSE 0.1
    b[1] = 0.5
    errors = reconstruction_errors(a, b)
    torch.testing.assert_close(errors["l1"], torch.tensor([0.025, 0.5]))
    torch.testing.assert_close(errors["l2"], torch.tensor([0.1, 0.5]))
    expected = [peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(2)]
    torch.testing.assert_close(errors["psnr"], torch.tensor(expected, dtype=torch.float32))
    assert abs(expected[0] - 20.0) < 1e-4


def _set_unet(checkpoint_dir, scale: float):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint_dir, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(scale)
        unet.conv_out.bias.mul_(scale)
    unet.save_pretrained(checkpoint_dir / "unet")


def test_selection_picks_the_known_best_checkpoint(tmp_path):
    base = save_tiny_base(tmp_path / "base", vae_channels=(16, 32, 32))
    manifest = write_manifest(tmp_path / "data", n=10)
    cfg = TailoredTrainingConfig(max_train_steps=3, checkpointing_steps=1, resolution=32, train_batch_size=4,
                                 report_to="none", lr_warmup_steps=0, validation_fraction=0.3, num_inversion_steps=10)
    out = tmp_path / "out"
    train_tailored(manifest, base, out, cfg)
    ckpts = out / "checkpoints"
    # A random VAE decodes every latent to nearly the same gray image, which would make all checkpoints
    # tie; fit the pipeline's VAE to the validation images first so reconstructions can be told apart.
    from diffusers import AutoencoderKL

    from cyclex.demo.base_sd import train_phantom_vae

    split = json.loads((out / "split.json").read_text())
    rows = {json.loads(line)["id"]: json.loads(line) for line in manifest.read_text().splitlines()}
    val_images = torch.stack([torch.from_numpy(load_gray_image(rows[i]["image"], 32))[None] for i in split["validation"]])
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    torch.manual_seed(0)
    train_phantom_vae(vae, val_images, steps=50, batch_size=len(val_images), learning_rate=3e-3)
    vae.save_pretrained(out / "vae")
    # eps == 0 everywhere: DDIM inversion and sampling are exact inverse rescalings, so the reconstruction
    # is the VAE round trip; a 30x noise prediction wrecks it; the third checkpoint is in between.
    _set_unet(ckpts / "checkpoint-000001", 30.0)
    _set_unet(ckpts / "checkpoint-000002", 0.0)
    _set_unet(ckpts / "checkpoint-000003", 3.0)
    selection = select_checkpoints(out)
    assert selection["best_psnr"] == selection["best_l1"] == selection["best_l2"] == "checkpoints/checkpoint-000002"
    assert selection["final"] == "checkpoints/checkpoint-000003"
    metrics = selection["metrics"]
    assert metrics["checkpoints/checkpoint-000002"]["psnr"] > metrics["checkpoints/checkpoint-000003"]["psnr"] > \
        metrics["checkpoints/checkpoint-000001"]["psnr"]
    assert json.loads((out / "selection.json").read_text()) == selection

    # The known value: PSNR of the VAE round trip of the validation images (computed independently).
    pipe = load_tailored_pipeline(out)  # best_psnr -> the folder's unet/, now checkpoint 2's zero output layer
    assert float(pipe.unet.conv_out.weight.detach().abs().max()) == 0.0
    psnrs = []
    for image_id in split["validation"]:
        image = load_gray_image(rows[image_id]["image"], 32)
        x = torch.from_numpy(image)[None, None].repeat(1, 3, 1, 1) * 2 - 1
        with torch.no_grad():
            z = pipe.vae.encode(x).latent_dist.mean
            back = pipe.vae.decode(z).sample.mean(1)[0]
        psnrs.append(peak_signal_noise_ratio(image, ((back + 1) / 2).clamp(0, 1).numpy(), data_range=1.0))
    assert metrics["checkpoints/checkpoint-000002"]["psnr"] == pytest.approx(float(np.mean(psnrs)), abs=1e-3)

    # The other selectors load their checkpoint by name.
    assert float(load_tailored_pipeline(out, "best_l2").unet.conv_out.weight.detach().abs().max()) == 0.0
    final = load_tailored_pipeline(out, "final")
    assert float(final.unet.conv_out.weight.detach().abs().max()) > 0.0
    with pytest.raises(FileNotFoundError, match="valid names"):
        load_tailored_pipeline(out, "checkpoints/checkpoint-000099")
    assert dataclasses.asdict(cfg)["num_inversion_steps"] == selection["num_inversion_steps"]
