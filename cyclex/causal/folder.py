"""A saved causal model: one folder with the HVAE, its parent predictors and what made them.

    DIR/hvae_config.json, DIR/hvae.safetensors            the image mechanism (CausalHVAE)
    DIR/predictor_config.json, DIR/predictor.safetensors  the parent predictors
    DIR/causal_model.json                                 arm, training seeds, settings, logs
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cyclex.atomic_io import write_text_atomic
from cyclex.causal.hvae import CausalHVAE
from cyclex.causal.parent_predictors import ParentPredictor

METADATA_NAME = "causal_model.json"


@dataclass
class CausalModel:
    hvae: CausalHVAE
    predictor: ParentPredictor
    metadata: dict = field(default_factory=dict)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        self.hvae.save_pretrained(directory)
        self.predictor.save_pretrained(directory)
        write_text_atomic(directory / METADATA_NAME, json.dumps(self.metadata, indent=2, sort_keys=True))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CausalModel:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"causal model folder {directory} does not exist (train one with `cyclex train-causal`)")
        hvae = CausalHVAE.from_pretrained(directory)
        predictor = ParentPredictor.from_pretrained(directory)
        if predictor.config.parent_findings != hvae.config.parent_findings:
            raise ValueError(f"{directory}: the parent predictor's findings {predictor.config.parent_findings} differ "
                             f"from the HVAE's {hvae.config.parent_findings}")
        meta_file = directory / METADATA_NAME
        metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        return cls(hvae=hvae, predictor=predictor, metadata=metadata)
