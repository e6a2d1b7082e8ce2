"""cyclex: cyclic counterfactual explanations for chest X-ray report generators.

Layers, lowest first (each imports only from itself and the layers before it):
core (`findings`, `atomic_io`, `jsonl`, `image_checks`, `run_lock`) -> models and data (`adapters`,
`labelers`, `datasets`, `tailored_training`, `counterfactuals.diffusion`) -> metrics and frames
(`explain`) -> counterfactual makers (`counterfactuals`) -> the cyclic engine and its run folder
(`cycle`) -> applications (`cli`, `specs`, `demo`).
"""

__version__ = "0.1.0"
