"""cyclex: cyclic counterfactual explanations for chest X-ray report generators."""

__version__ = "0.1.0"
