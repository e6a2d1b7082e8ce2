"""The cyclic engine (remove a finding, make the counterfactual, regenerate, verify) and its run folder."""

from cyclex.cycle.explainer import CycleResult, CyclicExplainer, cyclic_rate, images_to_batch, load_xray
from cyclex.cycle.run_folder import (
    RunFolderError,
    load_image_records,
    read_results,
    run_explain,
    run_explainer,
)

__all__ = [
    "CycleResult",
    "CyclicExplainer",
    "RunFolderError",
    "cyclic_rate",
    "images_to_batch",
    "load_image_records",
    "load_xray",
    "read_results",
    "run_explain",
    "run_explainer",
]
