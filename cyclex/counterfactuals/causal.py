"""The causal maker: counterfactuals from a deep structural causal model (conditional HVAE, SPEC section 5).

Removing a finding is do(finding = absent): the structured prompts map to the finding parents
(source prompt -> pa, target prompt -> pa~); age and sex, which no prompt states, are abducted
from the query by the model's parent predictors and held fixed. Then abduction, action, prediction
(`CausalHVAE.counterfactual`). No diffusion, no inversion: one encoder and two decoder passes per
request, deterministic, so the same request always gives the same image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cyclex.causal.folder import CausalModel
from cyclex.causal.parents import age_in_years
from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
from cyclex.findings import StructuredPrompt


class CausalCounterfactualMaker(CounterfactualMaker):
    """`CounterfactualMaker` over a `CausalModel` (HVAE + parent predictors).

    alpha: latent mixing with the counterfactual prior (None: the model's cf_alpha, 0.5).
    Queries of another size are resized to the model's side and the counterfactual back.
    """

    name = "causal"

    def __init__(self, model: CausalModel, *, alpha: float | None = None, batch_size: int = 32,
                 model_dir: str | None = None) -> None:
        self.model = model
        self.hvae = model.hvae.eval()
        self.predictor = model.predictor.eval()
        self.schema = self.hvae.config.schema
        self.alpha = alpha
        self.batch_size = int(batch_size)
        self.model_dir = model_dir

    @classmethod
    def from_pretrained(cls, directory: str | Path, **settings) -> CausalCounterfactualMaker:
        return cls(CausalModel.from_pretrained(directory), model_dir=str(Path(directory).resolve()), **settings)

    def _finding_parents(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[list[str]]]:
        rows, unmodelled = [], []
        for prompt in prompts:
            findings = StructuredPrompt.parse(prompt).findings
            rows.append([1.0 if f in findings else 0.0 for f in self.schema.findings])
            unmodelled.append([f for f in findings if f not in self.schema.findings])
        return torch.tensor(rows, dtype=torch.float32), unmodelled

    @torch.no_grad()
    def make(self, images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str], *,
             masks: torch.Tensor | None = None, seed: int = 0) -> CounterfactualOutput:
        # 1. Check inputs
        self.check_request(images, source_prompts, target_prompts)
        if masks is not None:
            self.check_masks(masks, images.shape[0], tuple(images.shape[-2:]))
        started = time.perf_counter()
        size = self.hvae.config.image_size
        x = images.float()
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        # 2. Parents: findings from the prompts, age and sex abducted by the parent predictors
        source, unmodelled = self._finding_parents(source_prompts)
        target, _ = self._finding_parents(target_prompts)
        attributes = torch.cat([self.predictor.predict(x[i:i + self.batch_size])[:, :2]
                                for i in range(0, x.shape[0], self.batch_size)])
        attributes[:, 1] = (attributes[:, 1] >= 0.5).float()
        pa = torch.cat([attributes, source], 1)
        pa_new = torch.cat([attributes, target], 1)
        # 3. Abduction, action, prediction
        out = torch.cat([self.hvae.counterfactual(x[i:i + self.batch_size], pa[i:i + self.batch_size],
                                                  pa_new[i:i + self.batch_size], self.alpha)
                         for i in range(0, x.shape[0], self.batch_size)])
        if tuple(out.shape[-2:]) != tuple(images.shape[-2:]):
            out = F.interpolate(out, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False).clamp(0, 1)
        # 4. Keep the query outside the mask
        if masks is not None:
            out = torch.where(masks > 0.5, out, images.float())
        seconds = (time.perf_counter() - started) / images.shape[0]
        details = [{"variant": self.name, "age_abducted": round(age_in_years(float(a[0])), 1),
                    "sex_abducted": "male" if a[1] > 0.5 else "female", "unmodelled_findings": u,
                    "seconds": round(seconds, 4)} for a, u in zip(attributes, unmodelled, strict=True)]
        return CounterfactualOutput(images=out.clamp(0.0, 1.0), details=details)

    def settings(self) -> dict[str, Any]:
        return {"variant": self.name, "causal_model": self.model_dir,
                "alpha": self.hvae.config.cf_alpha if self.alpha is None else self.alpha,
                "parents": list(self.schema.names), "arm": self.model.metadata.get("arm")}
