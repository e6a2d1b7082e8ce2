"""Counterfactual axioms of a trained DSCM (Monteiro et al. 2023) through the metric core.

effectiveness: the parent predictor recovers pa~ from x~ = DSCM(x, pa, pa~) (per parent; binary
parents flipped on every item, age moved to another item's age: mean absolute error in years);
composition: SSIM(x, DSCM(x, pa, pa)); with the exogenous noise u this holds by construction, so
the decoder's own reconstruction (without u) is reported beside it;
reversibility: SSIM(x, DSCM(DSCM(x, pa, pa~), pa~, pa)); FID of both sets against x when a feature
extractor is given. SSIM and FID come from `cyclex.explain` (the metric core).
"""

from __future__ import annotations

import numpy as np
import torch

from cyclex.causal.parents import age_in_years
from cyclex.explain.faithfulness import ssim
from cyclex.explain.population import axiom_composition, axiom_effectiveness, axiom_reversibility


class DSCM:
    """`dscm(x, pa, pa_new)` -> x~ in [0, 1], batched, without gradients: the metric core's Maker."""

    def __init__(self, model, batch_size: int = 32, alpha: float | None = None) -> None:
        self.model = model.eval()
        self.batch_size = int(batch_size)
        self.alpha = alpha

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, pa: torch.Tensor, pa_new: torch.Tensor) -> torch.Tensor:
        parts = [self.model.counterfactual(x[i:i + self.batch_size], pa[i:i + self.batch_size],
                                           pa_new[i:i + self.batch_size], self.alpha)
                 for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts)


def flip(pa: torch.Tensor, column: int) -> torch.Tensor:
    pa_new = pa.clone()
    pa_new[:, column] = 1.0 - pa[:, column]
    return pa_new


def evaluate_axioms(model, predictor, images: torch.Tensor, parents: torch.Tensor, *, feature_extractor=None,
                    seed: int = 0) -> dict:
    """The axioms on images (N, 1, S, S) in [0, 1] with their true parents (N, P)."""
    schema = model.config.schema
    dscm = DSCM(model)
    predict = predictor.predict
    per_parent, removal = {}, {}
    for column in schema.binary_columns:
        pa_new = flip(parents, column)
        per_parent[schema.names[column]] = float(axiom_effectiveness(dscm, images, parents, pa_new, predict)[column])
        if column in schema.finding_columns:
            present = parents[:, column] > 0.5
            if present.any():
                hit = axiom_effectiveness(dscm, images[present], parents[present], pa_new[present], predict)[column]
                removal[schema.names[column]] = {"rate": float(hit), "n": int(present.sum())}
    generator = torch.Generator().manual_seed(seed)
    pa_age = parents.clone()
    pa_age[:, 0] = parents[torch.randperm(parents.shape[0], generator=generator), 0]
    predicted_age = predict(dscm(images, parents, pa_age))[:, 0]
    age_mae = float(np.mean([abs(age_in_years(a) - age_in_years(b)) for a, b in zip(predicted_age, pa_age[:, 0], strict=True)]))
    findings = [per_parent[schema.names[c]] for c in schema.finding_columns]
    composition = axiom_composition(dscm, images, parents, feature_extractor)
    decoder_mean = torch.cat([model.decode_mean(images[i:i + 32], parents[i:i + 32]).detach()
                              for i in range(0, images.shape[0], 32)])
    # reversibility round trip through a flipped finding, one random finding per item
    columns = torch.tensor(schema.finding_columns)[torch.randint(len(schema.finding_columns), (images.shape[0],),
                                                                  generator=generator)]
    pa_rev = parents.clone()
    rows = torch.arange(parents.shape[0])
    pa_rev[rows, columns] = 1.0 - parents[rows, columns]
    reversibility = axiom_reversibility(dscm, images, parents, pa_rev, feature_extractor)
    return {
        "effectiveness_findings": float(np.mean(findings)),
        "effectiveness_per_parent": per_parent,
        "effectiveness_findings_removal": (float(np.mean([v["rate"] for v in removal.values()])) if removal else None),
        "effectiveness_removal_per_finding": removal,
        "effectiveness_age_mae_years": age_mae,
        "composition_ssim": composition.ssim_mean,
        "composition_ssim_decoder_mean": float(ssim(images, decoder_mean.clamp(0, 1)).mean()),
        "reversibility_ssim": reversibility.ssim_mean,
        "fid": {"composition": composition.fid, "reversibility": reversibility.fid},
        "n_images": int(images.shape[0]),
    }
