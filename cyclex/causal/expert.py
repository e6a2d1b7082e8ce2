"""The expert term of seed 004 eq. 2, alpha * log(1 + beta * |p(x) - p(x~)|), made differentiable.

p is a pluggable expert classifier of findings (torchxrayvision's DenseNet where its weights exist,
the phantom classifier in the demo; the application hands it in). The public follow-up evaluates the
term under no_grad, so it adds no gradient; here the expert runs with gradients into x~ (its own
weights stay frozen), so the term moves the image mechanism.

Sign: the paper's goal is to make the counterfactual's finding probability differ from the
factual's where the finding was intervened on, so training maximises the term (the loss subtracts
it), and only on items whose finding parent actually changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cyclex.findings import canonical_finding


class DifferentiableExpert:
    """An expert classifier `module(images (B, 1, H, W) in [0, 1]) -> logits (B, K)` with named classes.

    The module's parameters are frozen (requires_grad False) but gradients flow into the images.
    preprocess: optional differentiable map of [0, 1] images to the module's input (e.g. resizing
    and xrv's [-1024, 1024] scaling).
    """

    def __init__(self, module: nn.Module, class_names: Sequence[str],
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str = "expert") -> None:
        self.module = module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.class_names = tuple(class_names)
        self.preprocess = preprocess
        self.name = name

    def column(self, finding: str) -> int | None:
        """The expert's column of `finding`, None when it does not classify it."""
        key = canonical_finding(finding)
        return self.class_names.index(key) if key in self.class_names else None

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, K) sigmoid probabilities, differentiable in images."""
        x = self.preprocess(images) if self.preprocess is not None else images
        return torch.sigmoid(self.module(x))


def expert_term(p_factual: torch.Tensor, p_counterfactual: torch.Tensor, alpha: float = 1.0, beta: float = 10.0,
                changed: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * log(1 + beta * |p(x) - p(x~)|), averaged over the items where `changed` (B,) is True.

    p_factual, p_counterfactual: (B,) probabilities of the intervened finding. Returns a scalar
    (0 when no item changed), differentiable in p_counterfactual.
    """
    if p_factual.shape != p_counterfactual.shape:
        raise ValueError(f"p_factual {tuple(p_factual.shape)} and p_counterfactual {tuple(p_counterfactual.shape)} differ")
    values = alpha * torch.log1p(beta * (p_factual - p_counterfactual).abs())
    if changed is None:
        return values.mean()
    weights = changed.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


class _XRVLogits(nn.Module):
    """torchxrayvision's features2 + classifier as one module (its forward adds an op_norm we skip)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.features2(x)
        return self.model.classifier(features) if hasattr(self.model, "classifier") else self.model.model.fc(features)


def xrv_expert(classifier) -> DifferentiableExpert:
    """The paper's expert: a loaded `cyclex.explain.effectiveness.XRVClassifier`, made differentiable."""
    return DifferentiableExpert(_XRVLogits(classifier.model), classifier.class_names, preprocess=classifier.to_xrv_input,
                                name=f"torchxrayvision {classifier.weights_name or 'module'}")
