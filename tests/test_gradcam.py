"""Grad-CAM baselines: a hand-computable map, teacher forcing against transformers' loss, token masks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cyclex.explain.gradcam import (
    ReportGradCAM,
    TeacherForcedLogProb,
    TokenLogProbTarget,
    finding_token_mask,
    patch_tokens_to_grid,
)


def test_pytorch_grad_cam_is_installed():
    # a test dependency (the pyproject "test" extra): missing, it fails here instead of skipping
    from cyclex.explain.gradcam import require_gradcam

    assert hasattr(require_gradcam(), "GradCAM")


def _word_tokenizer():
    """A fast word-level tokenizer: heart = 0, clear = 1, </s> = 2 (offsets for the masks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"heart": 0, "clear": 1, "</s>": 2}, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="</s>", pad_token="</s>")


class UnitScale(torch.nn.Module):
    """x * 1 through a parameter, so its output carries a gradient (an identity would not)."""

    def __init__(self) -> None:
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.one


class SumCaptioner(torch.nn.Module):
    """logits_t = s * w at every position, s = sum of the encoder's (B, 1, H, W) map A = the first channel.

    log p(v) = w_v s - logsumexp(w s), so d log p(v) / dA_ij = w_v - sum_u p_u w_u =: c_v, the same at
    every pixel: Grad-CAM's channel weight is c_v and its map ReLU(c_v A), min-max scaled.
    """

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.encoder = UnitScale()  # the target layer: its output is A itself
        self.w = torch.nn.Parameter(torch.tensor(weights))

    def forward(self, pixel_values, labels, decoder_attention_mask):
        activations = self.encoder(pixel_values[:, :1])
        s = activations.sum(dim=(1, 2, 3))
        logits = s[:, None, None] * self.w[None, None, :]
        return SimpleNamespace(logits=logits.expand(-1, labels.shape[1], -1))


def test_gradcam_map_equals_the_hand_computed_one():
    image = np.array([[0.1, 0.3], [0.5, 0.9]], dtype=np.float32)
    model = SumCaptioner([1.0, 0.0, 0.0])
    explainer = ReportGradCAM(model, _word_tokenizer(), lambda x: torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1),
                              target_layer=model.encoder, reshape_transform=None)
    # "heart" (token 0) is the finding's word: c_0 = 1 - p_0 > 0, so the map is A min-max scaled;
    # in "clear heart" the span (0, 5) covers "clear" (token 1): c_1 = -p_0 < 0, ReLU leaves nothing
    maps = explainer(np.stack([image, image]), ["heart clear", "clear heart"], [[(0, 5)], [(0, 5)]])
    expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_allclose(maps[0], expected, atol=1e-5)
    np.testing.assert_allclose(maps[1], np.zeros_like(image), atol=1e-7)
    # no span: no word of the finding, an empty map
    empty = explainer(image[None], ["heart clear"], [[]])
    assert empty.shape == (1, 2, 2) and not empty.any()


def test_token_mask_marks_the_words_of_the_span():
    tokenizer = _word_tokenizer()
    ids, mask = finding_token_mask(tokenizer, "clear heart clear", [(6, 11)])
    assert ids == [1, 0, 1] and mask == [False, True, False]
    with pytest.raises(ValueError, match="not inside the report"):
        finding_token_mask(tokenizer, "heart", [(2, 9)])


def test_target_sums_the_masked_log_probabilities():
    output = torch.tensor([-1.0, -2.0, -4.0, 0.0])  # padded beyond the mask
    assert float(TokenLogProbTarget([True, False, True])(output)) == pytest.approx(-5.0)


def test_patch_tokens_to_grid_drops_the_class_token():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 class + 2 x 2 patches, 3 channels
    grid = patch_tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[1, :, 0, 1], tokens[1, 2])  # patch 1 (row 0, column 1) -> token 2
    with pytest.raises(ValueError, match="square grid"):
        patch_tokens_to_grid(tokens[:, :4])


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    from cyclex.adapters.hf import HFImageToTextGenerator
    from cyclex.demo.generators import (
        DemoGeneratorConfig,
        build_demo_model,
        demo_image_processor,
        train_report_tokenizer,
    )

    torch.manual_seed(0)
    reports = ["The heart is enlarged.", "There is a right pneumothorax.", "The lungs are clear.",
               "The heart is enlarged. There is a left pleural effusion."] * 4
    tokenizer = train_report_tokenizer(reports, vocab_size=300)
    config = DemoGeneratorConfig(image_size=32, patch_size=8, encoder_hidden=32, encoder_layers=1,
                                 decoder_hidden=32, decoder_layers=1, heads=2)
    model = build_demo_model(config, tokenizer, max_report_tokens=24)
    folder = tmp_path_factory.mktemp("tiny_gradcam_ved")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    demo_image_processor(32).save_pretrained(folder)
    return HFImageToTextGenerator.from_pretrained(folder, device="cpu")


def test_teacher_forced_log_probabilities_match_the_models_loss(tiny_generator):
    explainer = ReportGradCAM.from_generator(tiny_generator)
    reports = ["The heart is enlarged.", "There is a right pneumothorax. The lungs are clear."]
    labels, _ = explainer.labels_for(reports, [[], []])
    pixels = explainer.to_pixels(np.random.default_rng(0).random((2, 32, 32)).astype(np.float32))
    with torch.no_grad():
        log_probs = TeacherForcedLogProb(tiny_generator.model, labels)(pixels)
        valid = labels != -100
        mask = torch.cat([torch.ones_like(valid[:, :1]), valid[:, :-1]], dim=1).long()
        loss = tiny_generator.model(pixel_values=pixels, labels=labels, decoder_attention_mask=mask).loss
    assert log_probs.shape == labels.shape and bool((log_probs[~valid] == 0).all())
    assert float(-log_probs.sum() / valid.sum()) == pytest.approx(float(loss), rel=1e-5)


def test_report_gradcam_on_a_vit_generator(tiny_generator):
    explainer = ReportGradCAM.from_generator(tiny_generator)
    images = np.random.default_rng(1).random((2, 40, 40)).astype(np.float32)  # another size than the processor's
    report = "The heart is enlarged. There is a right pneumothorax."
    start = report.index("pneumothorax")
    ids, mask = finding_token_mask(tiny_generator.tokenizer, report, [(start, start + len("pneumothorax"))])
    named = tiny_generator.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "pneumothorax" in named and "heart" not in named
    was_training = tiny_generator.model.training
    maps = explainer(images, [report, report], [[(start, start + len("pneumothorax"))], []])
    assert maps.shape == (2, 40, 40) and np.isfinite(maps).all()
    assert 0 <= maps.min() and maps.max() <= 1 and maps[0].max() > 0 and not maps[1].any()
    assert tiny_generator.model.training == was_training
    with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
        explainer(images * 2, [report, report], [[], []])
    with pytest.raises(TypeError, match="encoder-decoder"):
        ReportGradCAM.from_generator(SimpleNamespace(model=None))
