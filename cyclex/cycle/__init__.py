"""The cyclic engine (remove a finding, make the counterfactual, regenerate, verify) and its run folder."""

from cyclex.cycle.explainer import CycleResult, CyclicExplainer, cyclic_rate, images_to_batch, load_xray

__all__ = ["CycleResult", "CyclicExplainer", "cyclic_rate", "images_to_batch", "load_xray"]
