"""Causal counterfactuals: a deep structural causal model on a conditional hierarchical VAE (SPEC section 5).

One idea per module: `parents` (the parent vector), `likelihood` (discretised Gaussian), `hvae` (the
model: abduction, action, prediction), `parent_predictors`, `training` (ELBO loop: AdamW, warm-up,
clip / skip, EMA, accelerate), `counterfactual_training` (Lagrangian, expert term), `expert`,
`active_learning` (forgetting events), `axioms`, `data` (phantoms with attributes), `folder` (the
saved model), `recipe` (seed 004's arms top to bottom). The cycle uses it through
`cyclex.counterfactuals.causal.CausalCounterfactualMaker`.

    from cyclex.causal import CausalModel
    model = CausalModel.from_pretrained("cyclex/demo/weights/causal")
    x_cf = model.hvae.counterfactual(x, pa, pa_new)  # (B, 1, 64, 64) in [0, 1]; pa: ParentSchema order
"""

from cyclex.causal.folder import CausalModel
from cyclex.causal.hvae import CausalHVAE, HVAEConfig
from cyclex.causal.parents import ParentSchema

__all__ = ["CausalHVAE", "CausalModel", "HVAEConfig", "ParentSchema"]
