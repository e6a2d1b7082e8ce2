"""Grad-CAM baseline maps of a report generator's image encoder (pytorch-grad-cam), next to the frames.

What is explained is the generator's own report: the teacher-forced log-probability of the words that
name one finding in the report it generated,

    y_f(x) = sum_{t in T_f} log p(w_t | w_<t, x),

T_f the report tokens that overlap the finding's mentions (character spans, e.g. `RuleLabeler.mentions`).
Grad-CAM (Selvaraju et al. 2017) weighs each channel k of an encoder layer's activations A^k by the
spatial mean of dy_f / dA^k and keeps ReLU(sum_k alpha_k A^k), upsampled to the image and scaled to
[0, 1]; `pytorch_grad_cam.GradCAM` does exactly that, with a `reshape_transform` that lays a ViT's
patch tokens out on their grid. The map is a baseline: it says where the encoder's features raise the
finding's words, not what the generator needs (the counterfactual frame answers that).

`ReportGradCAM.from_generator(generator)` takes a `cyclex.adapters.hf.HFImageToTextGenerator` over a
`VisionEncoderDecoderModel` (any encoder whose last layer emits (B, 1 + h*w, C) patch tokens, as ViT,
or (B, C, h, w) maps); `ReportGradCAM(...)` takes the parts. pytorch-grad-cam is an optional
dependency (`pip install "cyclex[gradcam]"`), imported when a map is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "TeacherForcedLogProb",
    "TokenLogProbTarget",
    "ReportGradCAM",
    "finding_token_mask",
    "patch_tokens_to_grid",
    "require_gradcam",
]

Span = tuple[int, int]  # [start, end) characters of a report


def require_gradcam():
    """The `pytorch_grad_cam` module, or an ImportError that says how to install it."""
    try:
        import pytorch_grad_cam
    except ImportError as error:
        raise ImportError("Grad-CAM baselines need pytorch-grad-cam: pip install 'cyclex[gradcam]' "
                          "(the PyPI package grad-cam)") from error
    return pytorch_grad_cam


def finding_token_mask(tokenizer, report: str, spans: Sequence[Span]) -> tuple[list[int], list[bool]]:
    """Token ids of `report` (no special tokens) and, per token, whether it overlaps one of `spans`.

    tokenizer: a fast tokenizer (it reports each token's character offsets); spans: [start, end)
    character ranges of `report`, e.g. the finding's mentions. A byte-level BPE token that carries the
    space before a word ("Ġheart") counts as overlapping when any of its characters does.
    """
    encoded = tokenizer(report, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded.get("offset_mapping")
    if offsets is None:
        raise ValueError(f"finding_token_mask: tokenizer {type(tokenizer).__name__} gives no offsets; a fast "
                         "tokenizer is needed")
    for start, end in spans:
        if not 0 <= start < end <= len(report):
            raise ValueError(f"finding_token_mask: span ({start}, {end}) is not inside the report of "
                             f"{len(report)} characters")
    mask = [any(a < end and start < b for start, end in spans) for a, b in offsets]
    return list(encoded["input_ids"]), mask


class TeacherForcedLogProb(torch.nn.Module):
    """pixel_values (B, 3, H, W) -> (B, L) log p(label_t | label_<t, image) of fixed reports, 0 at padding.

    model: a `VisionEncoderDecoderModel` (or anything called as model(pixel_values=, labels=,
    decoder_attention_mask=) returning `.logits` (B, L, V) for next tokens of `labels`, decoder
    inputs shifted right as transformers does). labels: (B, L) token ids, -100 where padded.
    """

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor) -> None:
        super().__init__()
        if labels.ndim != 2:
            raise ValueError(f"TeacherForcedLogProb: labels must be (B, L) token ids, got shape {tuple(labels.shape)}")
        self.model = model
        self.register_buffer("labels", labels.long(), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[0] != self.labels.shape[0]:
            raise ValueError(f"TeacherForcedLogProb: {pixel_values.shape[0]} images for {self.labels.shape[0]} reports")
        valid = self.labels != -100
        # decoder inputs are the labels shifted right behind the start token; only trailing padding
        decoder_mask = torch.cat([torch.ones_like(valid[:, :1]), valid[:, :-1]], dim=1).long()
        logits = self.model(pixel_values=pixel_values, labels=self.labels, decoder_attention_mask=decoder_mask).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(-1, self.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked * valid


class TokenLogProbTarget:
    """A pytorch-grad-cam target: the sum of one report's per-token log-probabilities where `mask` is set."""

    def __init__(self, mask: Sequence[bool] | torch.Tensor) -> None:
        self.mask = torch.as_tensor(mask, dtype=torch.bool)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if model_output.shape[-1] < self.mask.shape[0]:
            raise ValueError(f"TokenLogProbTarget: {model_output.shape[-1]} token log-probabilities for a mask "
                             f"of {self.mask.shape[0]}")
        mask = torch.zeros(model_output.shape[-1], dtype=model_output.dtype, device=model_output.device)
        mask[: self.mask.shape[0]] = self.mask.to(model_output.device, model_output.dtype)
        return (model_output * mask).sum()


def patch_tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """ViT output (B, 1 + h*w, C) (a class token first, a square grid of patches) -> (B, C, h, w)."""
    if tokens.ndim == 4:
        return tokens
    if tokens.ndim != 3:
        raise ValueError(f"patch_tokens_to_grid: expected (B, 1 + h*w, C) tokens, got shape {tuple(tokens.shape)}")
    patches = tokens[:, 1:, :]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"patch_tokens_to_grid: {patches.shape[1]} patch tokens do not form a square grid")
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def _default_target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The image encoder's last block's first norm (pytorch-grad-cam's ViT recipe): its output still has one
    token per patch, unlike the final pooler. Found by name, as transformers moved ViT's blocks between versions
    (`encoder.layer` in 4.x, `layers` in 5.x)."""
    encoder = getattr(model, "encoder", model)
    norms = [module for name, module in encoder.named_modules() if name.endswith("layernorm_before")]
    if not norms:
        raise ValueError(f"cannot find a Grad-CAM target layer (a ViT block's layernorm_before) in "
                         f"{type(encoder).__name__}; pass target_layer=")
    return norms[-1]


class ReportGradCAM:
    """Grad-CAM of an image encoder on the teacher-forced log-probability of a finding's words.

    model: the generator's encoder-decoder; tokenizer: its fast tokenizer; to_pixels: callable mapping
    (B, H, W) float images in [0, 1] to the model's pixel_values (B, 3, S, S); target_layer: the
    encoder layer whose activations are weighed (default: `_default_target_layer`); reshape_transform:
    activations -> (B, C, h, w) (default: `patch_tokens_to_grid`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, to_pixels: Callable[[np.ndarray], torch.Tensor], *,
                 target_layer: torch.nn.Module | None = None,
                 reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = patch_tokens_to_grid) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.to_pixels = to_pixels
        self.target_layer = target_layer if target_layer is not None else _default_target_layer(model)
        self.reshape_transform = reshape_transform

    @classmethod
    def from_generator(cls, generator: Any, **kwargs: Any) -> ReportGradCAM:
        """From a `HFImageToTextGenerator` over an encoder-decoder captioner (model, tokenizer, image processor)."""
        model, tokenizer = getattr(generator, "model", None), getattr(generator, "tokenizer", None)
        processor = getattr(generator, "image_processor", None)
        if model is None or tokenizer is None or processor is None or not hasattr(model, "encoder"):
            raise TypeError(f"Grad-CAM baselines need an encoder-decoder transformers generator with a tokenizer and "
                            f"an image processor (hf: VisionEncoderDecoderModel); got {type(generator).__name__}")
        from cyclex.adapters.hf import images_to_pil

        def to_pixels(images: np.ndarray) -> torch.Tensor:
            pil = images_to_pil(torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None])
            return processor(images=pil, return_tensors="pt").pixel_values

        return cls(model, tokenizer, to_pixels, **kwargs)

    def labels_for(self, reports: Sequence[str], spans: Sequence[Sequence[Span]]) -> tuple[torch.Tensor, list[list[bool]]]:
        """(B, L) labels (report tokens + end token, -100 padding) and each report's finding-token mask."""
        ids, masks = [], []
        for report, report_spans in zip(reports, spans, strict=True):
            tokens, mask = finding_token_mask(self.tokenizer, report, report_spans)
            eos = self.tokenizer.eos_token_id
            ids.append(tokens + ([eos] if eos is not None else []))
            masks.append(mask + ([False] if eos is not None else []))
        length = max(len(t) for t in ids)
        labels = torch.full((len(ids), length), -100, dtype=torch.long)
        for row, tokens in enumerate(ids):
            labels[row, : len(tokens)] = torch.tensor(tokens)
        return labels, masks

    def __call__(self, images: np.ndarray, reports: Sequence[str], spans: Sequence[Sequence[Span]]) -> np.ndarray:
        """(B, H, W) float images in [0, 1], their reports and each report's finding spans -> (B, H, W)
        Grad-CAM maps in [0, 1] at the images' size (all zero where no token names the finding or
        where the finding's words fall with every feature)."""
        import cv2

        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.min() < 0 or images.max() > 1:
            raise ValueError(f"ReportGradCAM: images must be (B, H, W) floats in [0, 1], got shape {images.shape}, "
                             f"range [{images.min():.3g}, {images.max():.3g}]")
        if not len(images) == len(reports) == len(spans):
            raise ValueError(f"ReportGradCAM: {len(images)} images, {len(reports)} reports, {len(spans)} span lists")
        GradCAM = require_gradcam().GradCAM
        labels, masks = self.labels_for(reports, spans)
        device = next(self.model.parameters()).device
        pixels = self.to_pixels(images).to(device)
        wrapped = TeacherForcedLogProb(self.model, labels.to(device))
        was_training = self.model.training
        try:
            with torch.enable_grad(), GradCAM(wrapped, [self.target_layer], reshape_transform=self.reshape_transform) as cam:
                maps = cam(pixels, [TokenLogProbTarget(mask) for mask in masks])
        finally:
            self.model.train(was_training)  # pytorch-grad-cam switches the model to eval()
        out = np.zeros(images.shape, dtype=np.float32)
        for index, (found, mask) in enumerate(zip(maps, masks, strict=True)):
            if not any(mask):
                continue
            found = np.asarray(found, dtype=np.float32)
            if found.shape != images.shape[1:]:  # the processor's size differs from the image's
                found = cv2.resize(found, (images.shape[2], images.shape[1]), interpolation=cv2.INTER_LINEAR)
            out[index] = found
        return np.clip(out, 0.0, 1.0)
