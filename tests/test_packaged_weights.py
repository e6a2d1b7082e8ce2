import json

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
    folder = tmp_path / "cache/tailored/clean"
    _fake_tailored(folder)
    (folder / "selection.json").write_text(json.dumps({"best_psnr": "checkpoints/checkpoint-000200"}))
    packaged.package_assets(tmp_path / "cache", tmp_path / "shipped")
    shipped = tmp_path / "shipped/tailored/clean"
    assert not (shipped / "checkpoints/checkpoint-000100").exists()
    assert len(list(shipped.rglob("*.safetensors"))) == 1
