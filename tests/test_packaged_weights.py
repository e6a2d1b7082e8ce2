import json

import torch
from safetensors.torch import load_file, save_file

from cyclex.demo import packaged


def _fake_tailored(folder):
    (folder / "unet").mkdir(parents=True)
    (folder / "checkpoints/checkpoint-000100/unet").mkdir(parents=True)
    (folder / "checkpoints/checkpoint-000200/unet").mkdir(parents=True)
    (folder / "dataset").mkdir()
    weights = {"w": torch.linspace(-1, 1, 7), "steps": torch.arange(3)}
    save_file(weights, str(folder / "unet/diffusion_pytorch_model.safetensors"))
    save_file(weights, str(folder / "checkpoints/checkpoint-000100/unet/diffusion_pytorch_model.safetensors"))
    save_file(weights, str(folder / "checkpoints/checkpoint-000200/unet/diffusion_pytorch_model.safetensors"))
    (folder / "checkpoints/checkpoint-000100/optimizer.bin").write_bytes(b"x" * 100)
    (folder / "dataset/manifest.jsonl").write_text("{}\n")
    (folder / "selection.json").write_text(json.dumps(
        {"best_psnr": "checkpoints/checkpoint-000200", "best_l1": "checkpoints/checkpoint-000100",
         "metrics": {"checkpoints/checkpoint-000100": {"psnr": 30.0}}}))
    return weights


def test_pack_then_install_round_trips_inference_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSETS", {"tailored/clean": "selection.json"})
    cache, shipped, fresh = tmp_path / "cache", tmp_path / "shipped", tmp_path / "fresh"
    weights = _fake_tailored(cache / "tailored/clean")
    packaged.package_assets(cache, shipped)
    packed = shipped / "tailored/clean"
    assert load_file(str(packed / "unet/diffusion_pytorch_model.safetensors"))["w"].dtype == torch.float16
    assert not (packed / "dataset").exists()  # training data is not shipped
    assert not (packed / "checkpoints/checkpoint-000100/optimizer.bin").exists()
    assert (packed / "checkpoints/checkpoint-000100/unet").is_dir()  # referenced by selection.json

    assert packaged.install_packaged_assets(fresh, shipped) == ["tailored/clean"]
    restored = load_file(str(fresh / "tailored/clean/unet/diffusion_pytorch_model.safetensors"))
    assert restored["w"].dtype == torch.float32
    torch.testing.assert_close(restored["w"], weights["w"], atol=1e-3, rtol=0)
    assert torch.equal(restored["steps"], weights["steps"])  # integer tensors keep their dtype
    assert packaged.install_packaged_assets(fresh, shipped) == []  # cached copies are left alone


def test_unreferenced_checkpoints_are_not_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSETS", {"tailored/clean": "selection.json"})
    folder = tmp_path / "cache/tailored/clean"
    _fake_tailored(folder)
    (folder / "selection.json").write_text(json.dumps(
        {"best_psnr": "checkpoints/checkpoint-000200", "best_l1": "checkpoints/checkpoint-000200"}))
    packaged.package_assets(tmp_path / "cache", tmp_path / "shipped")
    kept = sorted(p.name for p in (tmp_path / "shipped/tailored/clean/checkpoints").iterdir())
    assert kept == ["checkpoint-000200"]
