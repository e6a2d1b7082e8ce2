"""Effectiveness of a counterfactual: does a classifier stop seeing the finding? (SPEC section 2)

Counterfactual Probability Gain (seed 000, after PRISM): `CPG = logit_t(F) - logit_t(CF)`, the drop in
the raw logit of the target class t from factual F to counterfactual CF. Any classifier plugs in
behind the small `Classifier` protocol: a torch module (`TorchClassifier`), any callable
(`CallableClassifier`), torchxrayvision's DenseNet / ResNet (`XRVClassifier`), or the demo's phantom
classifier (`cyclex.demo.phantom_classifier`).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from cyclex.explain.faithfulness import _image_pair, as_image_batch
from cyclex.findings import UnknownFindingError, canonical_finding

logger = logging.getLogger(__name__)

__all__ = [
    "Classifier",
    "TorchClassifier",
    "CallableClassifier",
    "XRVClassifier",
    "XRVWeightsMissingError",
    "XRV_PATHOLOGY_FOR_FINDING",
    "class_index",
    "target_logits",
    "counterfactual_probability_gain",
]


@runtime_checkable
class Classifier(Protocol):
    """A multi-label X-ray classifier: `classifier(images (B, 1, H, W) in [0, 1]) -> logits (B, K)`.

    `class_names[k]` names column k (our canonical finding names where the class is one of ours).
    """

    class_names: Sequence[str]

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_logits(logits: object, batch: int, classes: int, who: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"classifier {who} returned {type(logits).__name__}, expected a (B, K) tensor of logits")
    if logits.shape != (batch, classes):
        raise ValueError(f"classifier {who} returned logits of shape {tuple(logits.shape)}, expected ({batch}, {classes})")
    return logits.float()


class TorchClassifier:
    """Wrap an `nn.Module` mapping (B, 1, H, W) in [0, 1] (after `preprocess`) to logits (B, K)."""

    def __init__(self, module: nn.Module, class_names: Sequence[str],
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.module = module.eval().to(self.device)
        self.class_names = tuple(class_names)
        self.preprocess = preprocess

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = as_image_batch(images)
        x = self.preprocess(images) if self.preprocess else images
        logits = self.module(x.to(self.device))
        return _check_logits(logits, images.shape[0], len(self.class_names), type(self.module).__name__).cpu()


class CallableClassifier:
    """Wrap any function `fn(images (B, 1, H, W) in [0, 1]) -> logits (B, K)` (tensor or array)."""

    def __init__(self, fn: Callable[[torch.Tensor], object], class_names: Sequence[str]) -> None:
        self.fn = fn
        self.class_names = tuple(class_names)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = as_image_batch(images)
        logits = self.fn(images)
        if not isinstance(logits, torch.Tensor):
            logits = torch.as_tensor(logits)
        return _check_logits(logits, images.shape[0], len(self.class_names), getattr(self.fn, "__name__", "callable"))


def class_index(class_names: Sequence[str], target: str | int) -> int:
    """Column of `target` (exact class name, finding name or alias, or an int index) in `class_names`."""
    names = list(class_names)
    if isinstance(target, int):
        if not 0 <= target < len(names):
            raise IndexError(f"class index {target} out of range for {len(names)} classes")
        return target
    if target in names:
        return names.index(target)
    try:
        canonical = canonical_finding(target)
    except UnknownFindingError:
        canonical = None
    if canonical in names:
        return names.index(canonical)
    raise KeyError(f"classifier has no class for {target!r}; its classes are: {', '.join(names)}")


def target_logits(classifier: Classifier, images, target: str | int | Sequence[str | int]) -> torch.Tensor:
    """Logit of the target class per image, (B,). `target` is one class for all or one per image."""
    logits = classifier(images)
    batch = logits.shape[0]
    targets = [target] * batch if isinstance(target, (str, int)) else list(target)
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
    columns = torch.tensor([class_index(classifier.class_names, t) for t in targets])
    return logits[torch.arange(batch), columns]


def counterfactual_probability_gain(classifier: Classifier, factual, counterfactual,
                                    target: str | int | Sequence[str | int]) -> torch.Tensor:
    """CPG = logit_t(F) - logit_t(CF) per image (seed 000 / PRISM), (B,); positive = finding weakened.

    factual, counterfactual: (B, 1, H, W) in [0, 1]; raw logits, no sigmoid (SPEC section 2).
    """
    factual, counterfactual = _image_pair(factual, counterfactual)
    return target_logits(classifier, factual, target) - target_logits(classifier, counterfactual, target)


# ----------------------------------------------------------------------------------------------
# torchxrayvision

# Our canonical finding -> torchxrayvision pathology label. Support Devices has no xrv class.
XRV_PATHOLOGY_FOR_FINDING: dict[str, str] = {
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Lung Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "Pleural_Thickening",
    "Fracture": "Fracture",
}
_FINDING_FOR_XRV = {v: k for k, v in XRV_PATHOLOGY_FOR_FINDING.items()}


class XRVWeightsMissingError(FileNotFoundError):
    """torchxrayvision weights are not on this machine (cyclex never downloads them)."""


def _xrv_safe_globals() -> list:
    """Classes that torchxrayvision's pickled DenseNet checkpoints reference, allow-listed for weights_only."""
    import collections

    import torchxrayvision as xrv

    modules = [xrv.models.DenseNet, xrv.models._DenseLayer, xrv.models._DenseBlock, xrv.models._Transition,
               nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear, nn.Sequential,
               nn.Dropout, collections.OrderedDict, set]
    return modules


def load_xrv_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """State dict from an xrv checkpoint: a plain state dict, or a pickled model (official DenseNets).

    Always `weights_only=True`; pickled models load with an allow-list of xrv / torch.nn classes.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(_xrv_safe_globals()):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                raise ValueError(
                    f"{path}: cannot read this torchxrayvision checkpoint with weights_only=True ({error}); "
                    "save its state_dict() to a file and pass that path instead"
                ) from error
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a pickled model, got {type(obj).__name__}")
    return obj


class _XRVResNet(nn.Module):
    """torchxrayvision's ResNet-50 layout (1-channel conv1), built without its downloader."""

    def __init__(self, num_classes: int) -> None:
        import torchvision

        super().__init__()
        self.model = torchvision.models.resnet50(num_classes=num_classes, weights=None)
        self.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def features2(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return torch.flatten(m.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.fc(self.features2(x))


class XRVClassifier:
    """torchxrayvision DenseNet-121 / ResNet-50 behind the `Classifier` and `ImageEncoder` protocols.

    weights: an xrv weights name (`densenet121-res224-all`, `densenet121-res224-chex`, ...,
    `resnet50-res512-all`). The checkpoint is read from `weights_path` or xrv's cache folder
    (~/.torchxrayvision/models_data/<file name of the release URL>); if absent, a clear error says
    which file to place where; nothing is downloaded. Input conversion: [0, 1] -> bilinear resize to
    the model's resolution -> xrv's [-1024, 1024] range. Outputs raw logits (no op_threshs, no
    sigmoid). `class_names` are our canonical finding names where xrv has the class
    (Effusion -> Pleural Effusion, Pleural_Thickening -> Pleural Other), else xrv's own label.
    `encode` returns the pooled penultimate features (1024-d DenseNet, 2048-d ResNet) for FID.
    """

    def __init__(self, weights: str = "densenet121-res224-all", weights_path: str | os.PathLike | None = None,
                 device: str | torch.device | None = None) -> None:
        import torchxrayvision as xrv

        if weights not in xrv.models.model_urls:
            raise ValueError(f"unknown torchxrayvision weights {weights!r}; valid: {sorted(xrv.models.model_urls)}")
        info = xrv.models.model_urls[weights]
        path = Path(weights_path) if weights_path else Path(xrv.utils.get_cache_dir()) / os.path.basename(info["weights_url"])
        if not path.is_file():
            raise XRVWeightsMissingError(
                f"torchxrayvision weights {weights!r} not found at {path}. Download {info['weights_url']} "
                f"on a connected machine and copy it to {path} (or pass weights_path=PATH); cyclex never downloads."
            )
        self.xrv_labels = tuple(info["labels"])
        self.class_names = tuple(_FINDING_FOR_XRV.get(label, label) for label in self.xrv_labels)
        self.resolution = int(info.get("input_resolution", 224))
        self.device = torch.device(device or "cpu")
        # weights=None: xrv would otherwise download; we load the state ourselves.
        if weights.startswith("resnet"):
            model: nn.Module = _XRVResNet(num_classes=len(self.xrv_labels))
            state = load_xrv_state_dict(path)
            if not any(k.startswith("model.") for k in state):
                state = {f"model.{k}": v for k, v in state.items()}
        else:
            model = xrv.models.DenseNet(weights=None, num_classes=len(self.xrv_labels))
            state = load_xrv_state_dict(path)
        state = {k: v for k, v in state.items() if k != "op_threshs"}
        model.load_state_dict(state, strict=True)
        self.model = model.eval().to(self.device)
        self.weights_name = weights
        logger.info("torchxrayvision %s loaded from %s", weights, path)

    @classmethod
    def from_module(cls, model: nn.Module, labels: Sequence[str], resolution: int = 224,
                    device: str | torch.device | None = None) -> XRVClassifier:
        """Wrap an already built xrv-layout module (e.g. `xrv.models.DenseNet(weights=None)`)."""
        self = cls.__new__(cls)
        self.xrv_labels = tuple(labels)
        self.class_names = tuple(_FINDING_FOR_XRV.get(label, label) for label in self.xrv_labels)
        self.resolution = resolution
        self.device = torch.device(device or "cpu")
        self.model = model.eval().to(self.device)
        self.weights_name = None
        return self

    def to_xrv_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 1, R, R) in [-1024, 1024] (xrv.datasets.normalize convention)."""
        images = as_image_batch(images).to(self.device)
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return images * 2048.0 - 1024.0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.to_xrv_input(images)
        features = self.model.features2(x)
        logits = self.model.classifier(features) if hasattr(self.model, "classifier") else self.model.model.fc(features)
        return logits.float().cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features2(self.to_xrv_input(images)).float().cpu()
