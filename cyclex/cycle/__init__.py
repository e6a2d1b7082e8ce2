"""The cyclic engine (remove a finding, make the counterfactual, regenerate, verify) and its run folder.

Above the counterfactual makers and the metric core, below the applications: `CyclicExplainer`
drives any `CounterfactualMaker` (calling its declared hooks) and computes maps and frames with
`cyclex.explain`; `ExplainSettings` (`settings.py`) are the typed settings of a run; `run_folder`
makes runs resumable and `report_data` / `report_html` turn a run into pages.
"""

from cyclex.cycle.explainer import CycleResult, CyclicExplainer, cyclic_rate, images_to_batch, load_xray
from cyclex.cycle.run_folder import (
    RunFolderError,
    load_image_records,
    read_results,
    run_explain,
    run_explainer,
)
from cyclex.cycle.settings import ExplainSettings, FrameSettings, SearchGrid

__all__ = [
    "CycleResult",
    "CyclicExplainer",
    "ExplainSettings",
    "FrameSettings",
    "RunFolderError",
    "SearchGrid",
    "cyclic_rate",
    "images_to_batch",
    "load_image_records",
    "load_xray",
    "read_results",
    "run_explain",
    "run_explainer",
]
