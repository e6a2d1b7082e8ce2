"""Parent predictors q_psi(pa_k | x): anti-causal classifiers of each parent from the image.

They measure effectiveness (does x~ show pa~?) and drive counterfactual training (maximise
log q_psi(pa~ | x~)); in the cycle they also abduct the age and sex of a query no one labelled.
Age is a Gaussian with a fixed standard deviation on the normalised scale; sex and findings are
Bernoulli.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cyclex.causal.module_folder import load_module_folder, save_module_folder
from cyclex.causal.parents import ParentSchema

CONFIG_NAME, WEIGHTS_NAME = "predictor_config.json", "predictor.safetensors"


@dataclass
class ParentPredictorConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)  # one strided 3x3 convolution per entry
    parent_findings: tuple[str, ...] = ParentSchema().findings
    age_sigma: float = 0.1  # standard deviation of the age likelihood, normalised scale (about 3.5 years)

    def __post_init__(self) -> None:
        self.channels, self.parent_findings = tuple(self.channels), tuple(self.parent_findings)

    @property
    def schema(self) -> ParentSchema:
        return ParentSchema(self.parent_findings)


def parent_log_likelihood(outputs: torch.Tensor, pa: torch.Tensor, age_sigma: float) -> torch.Tensor:
    """log q(pa_k | x) per parent -> (B, P) from the predictor's raw outputs (B, P)."""
    age = -0.5 * ((pa[:, :1] - outputs[:, :1]) / age_sigma) ** 2 - math.log(age_sigma * math.sqrt(2 * math.pi))
    binary = -F.binary_cross_entropy_with_logits(outputs[:, 1:], pa[:, 1:], reduction="none")
    return torch.cat([age, binary], 1)


class ParentPredictor(nn.Module):
    """(B, 1, S, S) in [0, 1] -> (B, P) raw outputs: column 0 the age mean, the others logits."""

    def __init__(self, config: ParentPredictorConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        previous = 1
        for width in config.channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.SiLU()]
            previous = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, config.schema.size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.body(images * 2.0 - 1.0)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1))

    def log_likelihood(self, images: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """log q(pa_k | x) per parent -> (B, P); differentiable in images (counterfactual training)."""
        return parent_log_likelihood(self(images), pa, self.config.age_sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P): normalised age, then probabilities of male and of each finding."""
        out = self(images)
        return torch.cat([out[:, :1].clamp(-1.0, 1.0), torch.sigmoid(out[:, 1:])], 1)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        return save_module_folder(self, self.config, directory, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ParentPredictor:
        return load_module_folder(cls, ParentPredictorConfig, directory, CONFIG_NAME, WEIGHTS_NAME, "parent predictor")
