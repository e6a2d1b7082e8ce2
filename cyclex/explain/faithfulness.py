"""Faithfulness of a counterfactual to its factual image (SPEC section 2, seed 000; seed 002).

All functions take two batches `a`, `b` of X-rays, (B, 1, H, W) float in [0, 1] (torch tensors or
numpy arrays; a single (H, W) image is promoted to (1, 1, H, W)) and return one value per image,
a float tensor of shape (B,).

- `pixel_l1`: mean absolute difference (PRISM's identity metric, seed 002).
- `pixel_l2`: root mean squared difference on [0, 1] (seed 000's "L2", **choice**: the paper gives
  no normalisation; RMSE keeps the 0.3 threshold meaningful for any image size).
- `ssim`, `psnr`: scikit-image with `data_range=1`.
- `LPIPSMetric`: the `lpips` package (AlexNet / VGG backbone weights from torchvision's cache).
- `ImageEncoder` / `CLIPImageEncoder`, `embedding_distances`, `clip_directional_similarity`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from cyclex.image_checks import check_image_batch

logger = logging.getLogger(__name__)

__all__ = [
    "as_image_batch",
    "pixel_l1",
    "pixel_l2",
    "ssim",
    "psnr",
    "LPIPSMetric",
    "LPIPSWeightsMissingError",
    "ImageEncoder",
    "CLIPImageEncoder",
    "embedding_distances",
    "clip_directional_similarity",
]


def as_image_batch(images: torch.Tensor | np.ndarray, *, name: str = "images") -> torch.Tensor:
    """Return `images` as a float32 (B, 1, H, W) tensor in [0, 1], checking NaN and range.

    Accepts (B, 1, H, W), (1, H, W) or (H, W), as torch tensor or numpy array.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.ndim == 2:
        images = images[None, None]
    elif images.ndim == 3 and images.shape[0] == 1:
        images = images[None]
    return check_image_batch(images.detach().cpu(), name=name)


def _image_pair(a, b, names=("factual", "counterfactual")) -> tuple[torch.Tensor, torch.Tensor]:
    a = as_image_batch(a, name=names[0])
    b = as_image_batch(b, name=names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def pixel_l1(a, b) -> torch.Tensor:
    """Mean |a - b| per image. a, b: (B, 1, H, W) in [0, 1] -> (B,) in [0, 1]."""
    a, b = _image_pair(a, b)
    return (a - b).abs().flatten(1).mean(1)


def pixel_l2(a, b) -> torch.Tensor:
    """RMSE per image, sqrt(mean((a - b)^2)) on [0, 1] (SPEC section 2 choice) -> (B,) in [0, 1]."""
    a, b = _image_pair(a, b)
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def ssim(a, b) -> torch.Tensor:
    """Structural similarity per image (scikit-image, data_range=1) -> (B,) in [-1, 1]."""
    from skimage.metrics import structural_similarity

    a, b = _image_pair(a, b)
    values = [structural_similarity(x[0].numpy(), y[0].numpy(), data_range=1.0) for x, y in zip(a, b, strict=True)]
    return torch.tensor(values, dtype=torch.float32)


def psnr(a, b) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (scikit-image, data_range=1); identical images give inf."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _image_pair(a, b)
    values = []
    for x, y in zip(a, b, strict=True):
        if torch.equal(x, y):
            values.append(float("inf"))  # skimage would divide by zero here
        else:
            values.append(peak_signal_noise_ratio(x[0].numpy(), y[0].numpy(), data_range=1.0))
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# LPIPS

# torchvision's file names for the ImageNet backbones lpips builds on.
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class LPIPSWeightsMissingError(FileNotFoundError):
    """The ImageNet backbone weights LPIPS needs are not on this machine."""


def torch_hub_checkpoint_dir() -> Path:
    """torchvision's weight cache: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


class LPIPSMetric:
    """LPIPS distance (Zhang et al. 2018) between X-ray batches, via the `lpips` package.

    The linear heads ship with `lpips`; the backbone (AlexNet by default) is torchvision's ImageNet
    checkpoint, looked up at `backbone_weights` or in torch's hub cache, never downloaded.
    `random_backbone=True` builds a randomly initialised backbone (tests; the values are then not
    LPIPS as published). Grayscale is repeated to 3 channels and scaled to [-1, 1].
    Call: `metric(a, b)` with (B, 1, H, W) in [0, 1] -> (B,) distances >= 0 (lower = more similar).
    """

    def __init__(
        self,
        net: str = "alex",
        backbone_weights: str | os.PathLike | None = None,
        random_backbone: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        import lpips

        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
        self.net_name = net
        self.device = torch.device(device or "cpu")
        weights_path = None
        if not random_backbone:
            weights_path = Path(backbone_weights) if backbone_weights else torch_hub_checkpoint_dir() / LPIPS_BACKBONE_FILES[net]
            if not weights_path.is_file():
                raise LPIPSWeightsMissingError(
                    f"LPIPS needs the torchvision ImageNet backbone weights for net={net!r}: file {weights_path} "
                    f"not found. Copy {LPIPS_BACKBONE_FILES[net]} into {torch_hub_checkpoint_dir()} (or pass "
                    f"backbone_weights=PATH); use random_backbone=True only for tests."
                )
        # pnet_rand=True: lpips must not call torchvision's downloader; we load the backbone ourselves.
        with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' `pretrained=` call
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if weights_path is not None:
            self._load_backbone(weights_path)
        self.model.eval().to(self.device)
        self.random_backbone = random_backbone

    def _load_backbone(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        if not features:
            raise ValueError(f"{path} is not a torchvision {self.net_name} checkpoint (no 'features.*' keys)")
        # lpips splits torchvision's `features` Sequential into slices that keep the original indices.
        targets = {}
        for slice_name, module in self.model.net.named_children():
            for index, _ in module.named_children():
                targets[index] = slice_name
        remapped = {}
        for key, value in features.items():
            index, _, param = key.partition(".")
            if index not in targets:
                raise ValueError(f"{path}: unexpected backbone layer features.{index} for LPIPS net {self.net_name}")
            remapped[f"{targets[index]}.{index}.{param}"] = value
        self.model.net.load_state_dict(remapped, strict=True)
        logger.info("LPIPS backbone loaded from %s", path)

    @staticmethod
    def to_lpips_input(images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1], the input lpips expects."""
        return images.repeat(1, 3, 1, 1) * 2.0 - 1.0

    @torch.no_grad()
    def __call__(self, a, b) -> torch.Tensor:
        a, b = _image_pair(a, b)
        a = self.to_lpips_input(a).to(self.device)
        b = self.to_lpips_input(b).to(self.device)
        return self.model(a, b).flatten().float().cpu()


# ----------------------------------------------------------------------------------------------
# Image encoders (CLIP or any stand-in) and embedding distances


@runtime_checkable
class ImageEncoder(Protocol):
    """Anything that embeds X-rays: `encode(images (B, 1, H, W) in [0, 1]) -> (B, D) float`."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPImageEncoder:
    """CLIP image (and, for a full CLIPModel, text) embeddings from a local folder or a hub id.

    `path_or_id` may hold a `CLIPModel` (image + text towers) or a `CLIPVisionModelWithProjection`.
    Images: gray repeated to RGB, bilinear resize to the model's `image_size`, normalised with the
    image processor's mean/std when the folder has one, else CLIP's. `local_files_only=True` by
    default so nothing is downloaded unless asked.
    """

    def __init__(self, path_or_id: str | os.PathLike, device: str | torch.device | None = None,
                 local_files_only: bool = True) -> None:
        from transformers import AutoConfig

        self.device = torch.device(device or "cpu")
        source = str(path_or_id)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        except OSError as error:
            raise FileNotFoundError(
                f"no CLIP model at {source!r} (local_files_only={local_files_only}): {error}"
            ) from error
        self.tokenizer = None
        if config.model_type == "clip":
            from transformers import CLIPModel

            self.model = CLIPModel.from_pretrained(source, local_files_only=local_files_only)
            vision_config = config.vision_config
            try:
                from transformers import CLIPTokenizer

                self.tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local_files_only)
            except (OSError, ValueError, TypeError):
                logger.info("no tokenizer in %s: text embeddings unavailable", source)
        elif config.model_type == "clip_vision_model":
            from transformers import CLIPVisionModelWithProjection

            self.model = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=local_files_only)
            vision_config = config
        else:
            raise ValueError(f"{source}: expected a CLIP model (model_type 'clip' or 'clip_vision_model'), "
                             f"got model_type {config.model_type!r}")
        self.model.eval().to(self.device)
        self.image_size = int(vision_config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        processor_file = Path(source) / "preprocessor_config.json"
        if processor_file.is_file():
            import json

            processor = json.loads(processor_file.read_text())
            self.mean = tuple(processor.get("image_mean", CLIP_MEAN))
            self.std = tuple(processor.get("image_std", CLIP_STD))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 3, S, S) CLIP pixel values."""
        images = as_image_batch(images).to(self.device)
        images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        images = images.repeat(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (B, D), not normalised."""
        pixel_values = self.preprocess(images)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixel_values)
        else:
            out = self.model(pixel_values=pixel_values).image_embeds
        if not isinstance(out, torch.Tensor):  # transformers 5 may return an output object
            out = out.pooler_output
        return out.float().cpu()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (B, D); needs a full CLIPModel folder with a tokenizer."""
        if self.tokenizer is None or not hasattr(self.model, "get_text_features"):
            raise ValueError("text embeddings need a full CLIPModel folder with its tokenizer")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(**tokens)
        if not isinstance(out, torch.Tensor):
            out = out.pooler_output
        return out.float().cpu()


def _check_embeddings(e_a: torch.Tensor, e_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e_a = torch.as_tensor(e_a, dtype=torch.float32)
    e_b = torch.as_tensor(e_b, dtype=torch.float32)
    if e_a.ndim != 2 or e_a.shape != e_b.shape:
        raise ValueError(f"embeddings must both be (B, D) with equal shapes, got {tuple(e_a.shape)} and {tuple(e_b.shape)}")
    if torch.isnan(e_a).any() or torch.isnan(e_b).any():
        raise ValueError("embeddings contain NaN values")
    return e_a, e_b


def embedding_distances(e_a, e_b, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cosine similarity, L1 distance, L2 distance) between embeddings, each (B,).

    e_a, e_b: (B, D). With `normalize=True` (**choice**, default) L1 (sum |a - b|) and L2 (Euclidean)
    are measured between unit-normalised embeddings, so they are scale-free like the cosine; these are
    seed 000's LL1 and LL2 in the FET score.
    """
    e_a, e_b = _check_embeddings(e_a, e_b)
    cosine = F.cosine_similarity(e_a, e_b, dim=1)
    if normalize:
        e_a, e_b = F.normalize(e_a, dim=1), F.normalize(e_b, dim=1)
    diff = e_a - e_b
    return cosine, diff.abs().sum(1), diff.pow(2).sum(1).sqrt()


def clip_directional_similarity(image_factual, image_counterfactual, text_original, text_edited) -> torch.Tensor:
    """S_CLIP = cos(E_I(CF) - E_I(F), E_T(P_edit) - E_T(P_orig)) per item (PRISM / LANCE), (B,) in [-1, 1].

    All four arguments are (B, D) embeddings (text ones may be (1, D), broadcast). PRISM drops edits
    with S_CLIP < 0.1 (`scores.DIRECTIONAL_SIMILARITY_THRESHOLD`). A zero direction gives 0.
    """
    f, cf = _check_embeddings(image_factual, image_counterfactual)
    t_orig = torch.as_tensor(text_original, dtype=torch.float32)
    t_edit = torch.as_tensor(text_edited, dtype=torch.float32)
    if t_orig.shape != t_edit.shape or t_orig.ndim != 2 or t_orig.shape[1] != f.shape[1]:
        raise ValueError(f"text embeddings must be (B or 1, {f.shape[1]}), got {tuple(t_orig.shape)} and {tuple(t_edit.shape)}")
    image_direction = cf - f
    text_direction = (t_edit - t_orig).expand_as(image_direction)
    return F.cosine_similarity(image_direction, text_direction, dim=1, eps=1e-12)
