"""One folder per causal network: its dataclass config as JSON beside its safetensors weights.

The HVAE and the parent predictors are plain `nn.Module`s with a dataclass config (not diffusers /
transformers models), so they get this small save / load pair instead of `ModelMixin`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from torch import nn

from cyclex.atomic_io import write_text_atomic


def save_module_folder(module: nn.Module, config, directory: str | os.PathLike, config_name: str,
                       weights_name: str) -> Path:
    """Write DIR/config_name (asdict(config)) and DIR/weights_name (the state dict); returns DIR."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / config_name, json.dumps(asdict(config), indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, directory / weights_name)
    return directory


def load_module_folder(build, config_class, directory: str | os.PathLike, config_name: str, weights_name: str,
                       kind: str, missing_hint: str = "") -> nn.Module:
    """build(config_class(**DIR/config_name)) with DIR/weights_name loaded strictly, in eval mode.

    A missing file is a FileNotFoundError naming it, what it belongs to (`kind`) and `missing_hint`.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (config_name, weights_name):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{kind} file missing: {directory / name}{missing_hint}")
    model = build(config_class(**json.loads((directory / config_name).read_text())))
    model.load_state_dict(load_file(directory / weights_name), strict=True)
    return model.eval()
