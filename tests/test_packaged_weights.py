import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cyclex.demo import packaged

UNET_FILE = "diffusion_pytorch_model.safetensors"


def _fake_tailored(folder):
    """unet/ equals checkpoint-000200 (the best-PSNR one, as in a real folder); 000100 differs."""
    for sub in ("unet", "checkpoints/checkpoint-000100/unet", "checkpoints/checkpoint-000200/unet", "dataset"):
        (folder / sub).mkdir(parents=True)
    best = {"w": torch.linspace(-1, 1, 7), "steps": torch.arange(3)}
    early = {"w": torch.linspace(0, 2, 7), "steps": torch.arange(3)}
    save_file(best, str(folder / "unet" / UNET_FILE))
    save_file(early, str(folder / "checkpoints/checkpoint-000100/unet" / UNET_FILE))
    save_file(best, str(folder / "checkpoints/checkpoint-000200/unet" / UNET_FILE))
    (folder / "checkpoints/checkpoint-000100/optimizer.bin").write_bytes(b"x" * 100)
    (folder / "dataset/manifest.jsonl").write_text("{}\n")
    (folder / "selection.json").write_text(json.dumps(
        {"best_psnr": "checkpoints/checkpoint-000200", "best_l1": "checkpoints/checkpoint-000100",
         "metrics": {"checkpoints/checkpoint-000100": {"psnr": 30.0}}}))
    return {"unet": best, "checkpoints/checkpoint-000100/unet": early, "checkpoints/checkpoint-000200/unet": best}


def test_pack_then_install_round_trips_inference_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSETS", {"tailored/clean": "selection.json"})
    monkeypatch.setattr(packaged, "FILES", ())
    cache, shipped, fresh = tmp_path / "cache", tmp_path / "shipped", tmp_path / "fresh"
    expected = _fake_tailored(cache / "tailored/clean")
    packaged.package_assets(cache, shipped)
    packed = shipped / "tailored/clean"
    tensors = sorted(packed.rglob("*.safetensors"))
    assert len(tensors) == 2  # unet/ and checkpoint-000200 are identical: shipped once
    assert all(load_file(str(t))["w"].dtype == torch.float16 for t in tensors)
    assert not (packed / "dataset").exists()  # training data is not shipped
    assert not (packed / "checkpoints/checkpoint-000100/optimizer.bin").exists()

    assert packaged.install_packaged_assets(fresh, shipped) == ["tailored/clean"]
    for folder, weights in expected.items():  # every referenced UNet is usable again, in float32
        restored = load_file(str(fresh / "tailored/clean" / folder / UNET_FILE))
        assert restored["w"].dtype == torch.float32
        torch.testing.assert_close(restored["w"], weights["w"], atol=1e-3, rtol=0)
        assert torch.equal(restored["steps"], weights["steps"])  # integer tensors keep their dtype
    assert packaged.install_packaged_assets(fresh, shipped) == []  # cached copies are left alone


def test_unreferenced_checkpoints_are_not_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSETS", {"tailored/clean": "selection.json"})
    monkeypatch.setattr(packaged, "FILES", ())
    folder = tmp_path / "cache/tailored/clean"
    _fake_tailored(folder)
    (folder / "selection.json").write_text(json.dumps({"best_psnr": "checkpoints/checkpoint-000200"}))
    packaged.package_assets(tmp_path / "cache", tmp_path / "shipped")
    shipped = tmp_path / "shipped/tailored/clean"
    assert not (shipped / "checkpoints/checkpoint-000100").exists()
    assert len(list(shipped.rglob("*.safetensors"))) == 1


def test_single_files_are_shipped_and_installed_once(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSETS", {})
    cache, shipped, fresh = tmp_path / "cache", tmp_path / "shipped", tmp_path / "fresh"
    cache.mkdir()
    with pytest.raises(FileNotFoundError, match="cf_thresholds.json"):
        packaged.package_assets(cache, shipped)
    (cache / "cf_thresholds.json").write_text('{"thresholds": {"lpips": 0.5}}')
    assert packaged.package_assets(cache, shipped) == {"cf_thresholds.json": len('{"thresholds": {"lpips": 0.5}}')}
    assert packaged.install_packaged_assets(fresh, shipped) == ["cf_thresholds.json"]
    assert (fresh / "cf_thresholds.json").read_text() == '{"thresholds": {"lpips": 0.5}}'
    (fresh / "cf_thresholds.json").write_text("{}")  # a cached file is never overwritten
    assert packaged.install_packaged_assets(fresh, shipped) == []
    assert (fresh / "cf_thresholds.json").read_text() == "{}"


def test_upgraded_shipped_weights_replace_installed_copies_but_not_local_builds(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSETS", {"tailored/clean": "selection.json"})
    cache, shipped, fresh = tmp_path / "cache", tmp_path / "shipped", tmp_path / "fresh"
    _fake_tailored(cache / "tailored/clean")
    (cache / "cf_thresholds.json").write_text('{"v": 1}')
    packaged.package_assets(cache, shipped)
    assert packaged.install_packaged_assets(fresh, shipped) == ["tailored/clean", "cf_thresholds.json"]
    assert packaged.install_packaged_assets(fresh, shipped) == []  # unchanged: nothing to do
    # a new cyclex ships new weights: the installed copies are replaced
    (shipped / "cf_thresholds.json").write_text('{"v": 2}')
    save_file({"w": torch.zeros(7)}, str(shipped / "tailored/clean/checkpoints/checkpoint-000100/unet" / UNET_FILE))
    assert packaged.install_packaged_assets(fresh, shipped) == ["tailored/clean", "cf_thresholds.json"]
    assert (fresh / "cf_thresholds.json").read_text() == '{"v": 2}'
    assert torch.equal(load_file(str(fresh / "tailored/clean/checkpoints/checkpoint-000100/unet" / UNET_FILE))["w"], torch.zeros(7))
    # what the user rebuilt or recalibrated since is theirs: kept across later upgrades
    (fresh / "cf_thresholds.json").write_text('{"mine": true}')
    (fresh / "tailored/clean/selection.json").write_text('{"best_psnr": "unet"}')
    (shipped / "cf_thresholds.json").write_text('{"v": 3}')
    save_file({"w": torch.ones(7)}, str(shipped / "tailored/clean/checkpoints/checkpoint-000100/unet" / UNET_FILE))
    assert packaged.install_packaged_assets(fresh, shipped) == []
    assert (fresh / "cf_thresholds.json").read_text() == '{"mine": true}'
    # and a cache built here (never installed) is never touched
    assert packaged.install_packaged_assets(cache, shipped) == []
    assert (cache / "cf_thresholds.json").read_text() == '{"v": 1}'


def test_fresh_machine_scores_with_the_shipped_thresholds(tmp_path, monkeypatch):
    """No recalibration on a fresh machine: the demo path gets the shipped file, value for value."""
    from cyclex.demo import cf_thresholds
    from cyclex.explain.cf_threshold_calibration import load_cf_thresholds

    monkeypatch.setenv("CYCLEX_HOME", str(tmp_path))
    monkeypatch.setattr(packaged, "ASSETS", {})  # only the single files: no model copying in this test
    shipped = packaged.PACKAGED_DIR / "cf_thresholds.json"
    expected = json.loads(shipped.read_text())["thresholds"]
    # scorer None: a recalibration would fail, so passing proves the shipped file was read
    thresholds = cf_thresholds.thresholds_for(None, cf_thresholds.demo_thresholds_path())
    assert vars(thresholds) == expected
    assert load_cf_thresholds(tmp_path / "demo" / "cf_thresholds.json") == thresholds
    assert json.loads(shipped.read_text())["provenance"]["version"] == cf_thresholds.CALIBRATION_VERSION


def test_calibration_autoencoder_falls_back_to_the_tailored_vae(tmp_path, monkeypatch):
    """Without a built base SD (a fresh machine) the VAE round trip comes from the tailored SD."""
    from cycle_fakes import write_tiny_tailored

    from cyclex.demo import cf_thresholds

    monkeypatch.setenv("CYCLEX_HOME", str(tmp_path))
    assert cf_thresholds.demo_autoencoder() is None  # nothing cached at all
    folder = write_tiny_tailored(tmp_path / "demo" / "tailored" / "clean")
    round_trip = cf_thresholds.demo_autoencoder()
    assert round_trip is not None
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 64)
    out = round_trip(images)
    assert out.shape == images.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0

    from cyclex.counterfactuals.diffusion import LatentDiffusion
    from cyclex.tailored_training import load_tailored_pipeline

    direct = LatentDiffusion(load_tailored_pipeline(folder, dtype=torch.float32), num_inference_steps=1)
    with torch.no_grad():
        torch.testing.assert_close(out, direct.decode_latents(direct.encode_images(images)).cpu())
