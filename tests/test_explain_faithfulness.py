"""Faithfulness metrics: by hand, against scikit-image, the lpips package and a tiny CLIP built from config."""

import math

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cyclex.explain.faithfulness import (
    CLIPImageEncoder,
    LPIPSMetric,
    LPIPSWeightsMissingError,
    clip_directional_similarity,
    embedding_distances,
    pixel_l1,
    pixel_l2,
    psnr,
    ssim,
)


def images(seed: int, shape=(2, 1, 32, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_pixel_l1_l2_by_hand():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[0.0, 0.5], [1.0, 0.5]]]])
    assert pixel_l1(a, b).tolist() == [pytest.approx(0.5)]
    assert pixel_l2(a, b).tolist() == [pytest.approx(math.sqrt((0.25 + 1 + 0.25) / 4))]
    assert pixel_l2(b[0, 0].numpy(), b[0, 0].numpy()).tolist() == [0.0]  # (H, W) arrays are promoted


def test_ssim_psnr_match_scikit_image():
    a, b = images(0), images(1)
    for i in range(2):
        x, y = a[i, 0].numpy(), b[i, 0].numpy()
        assert float(ssim(a, b)[i]) == pytest.approx(structural_similarity(x, y, data_range=1.0), abs=1e-6)
        assert float(psnr(a, b)[i]) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-4)
        mse = float(((a[i] - b[i]) ** 2).mean())
        assert float(psnr(a, b)[i]) == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert psnr(a, a).tolist() == [math.inf, math.inf]


def test_image_checks_name_the_problem():
    a = images(0)
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pixel_l1(bad, a)
    with pytest.raises(ValueError, match="same shape"):
        pixel_l2(a, images(1, (2, 1, 16, 16)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ssim(a * 3, a)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        pixel_l1(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lpips_matches_the_lpips_package_on_the_same_random_backbone():
    a, b = images(2), images(3)
    torch.manual_seed(7)
    ours = LPIPSMetric(net="alex", random_backbone=True)
    torch.manual_seed(7)
    reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        expected = reference(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1), normalize=True).flatten()
    assert torch.allclose(ours(a, b), expected, atol=1e-6)
    assert torch.allclose(ours(a, a), torch.zeros(2), atol=1e-7)


def test_lpips_loads_a_torchvision_backbone_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    backbone = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(backbone.state_dict(), path)
    metric = LPIPSMetric(net="alex", backbone_weights=path)
    assert torch.equal(metric.model.net.slice1[0].weight, backbone.features[0].weight)
    assert torch.equal(getattr(metric.model.net.slice5, "10").bias, backbone.features[10].bias)


def test_lpips_missing_backbone_says_which_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(LPIPSWeightsMissingError, match="alexnet-owt-7be5be79.pth"):
        LPIPSMetric(net="alex")
    with pytest.raises(LPIPSWeightsMissingError, match="nothere.pth"):
        LPIPSMetric(net="vgg", backbone_weights=tmp_path / "nothere.pth")


def test_embedding_distances_by_hand():
    e_a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    e_b = torch.tensor([[0.0, 4.0], [2.0, 2.0]])
    cosine, l1, l2 = embedding_distances(e_a, e_b)
    assert cosine.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert l1.tolist() == pytest.approx([2.0, 0.0], abs=1e-6)  # unit vectors (1, 0) and (0, 1)
    assert l2.tolist() == pytest.approx([math.sqrt(2), 0.0], abs=1e-6)
    _, l1_raw, l2_raw = embedding_distances(e_a, e_b, normalize=False)
    assert l1_raw.tolist() == pytest.approx([7.0, 2.0])
    assert l2_raw.tolist() == pytest.approx([5.0, math.sqrt(2)])
    with pytest.raises(ValueError, match="equal shapes"):
        embedding_distances(e_a, e_b[:1])


def test_directional_similarity_by_hand():
    f = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    cf = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t_orig = torch.tensor([[0.0, 0.0]])
    t_edit = torch.tensor([[2.0, 2.0]])
    values = clip_directional_similarity(f, cf, t_orig, t_edit)
    assert values.tolist() == pytest.approx([1 / math.sqrt(2), 0.0], abs=1e-6)  # zero image direction -> 0


PROMPTS = ["The lung with abnormalities Cardiomegaly", "The lung with no abnormalities"]


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from cyclex.demo.tiny_sd import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(PROMPTS, model_max_length=16)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 16,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_clip_image_encoder_matches_a_manual_call(tiny_clip_folder):
    folder, model, _ = tiny_clip_folder
    encoder = CLIPImageEncoder(folder)
    x = images(4, (2, 1, 48, 48))
    embeddings = encoder.encode(x)
    assert embeddings.shape == (2, 8)
    pixels = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=(pixels - mean) / std)
    expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert torch.allclose(embeddings, expected, atol=1e-5)


def test_clip_text_embeddings_and_directional_similarity(tiny_clip_folder):
    folder, model, tokenizer = tiny_clip_folder
    encoder = CLIPImageEncoder(folder)
    text = encoder.encode_text(PROMPTS)
    with torch.no_grad():
        out = model.get_text_features(**tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert torch.allclose(text, expected, atol=1e-5)
    factual, counterfactual = encoder.encode(images(6)), encoder.encode(images(7))
    similarity = clip_directional_similarity(factual, counterfactual, text[:1], text[1:])
    direction = (counterfactual - factual)
    by_hand = (direction @ (text[1] - text[0])) / (direction.norm(dim=1) * (text[1] - text[0]).norm())
    assert torch.allclose(similarity, by_hand, atol=1e-5)


def test_clip_vision_only_folder_and_missing_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                              image_size=32, patch_size=8, projection_dim=8)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "vision")
    encoder = CLIPImageEncoder(tmp_path / "vision")
    assert encoder.encode(images(5)).shape == (2, 8)
    with pytest.raises(ValueError, match="text embeddings"):
        encoder.encode_text(["The lung with no abnormalities"])
    with pytest.raises(FileNotFoundError, match="no CLIP model"):
        CLIPImageEncoder(tmp_path / "missing")


def test_numpy_input_is_accepted():
    a = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    assert pixel_l1(a, a).tolist() == [0.0]
