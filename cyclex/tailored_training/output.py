"""The tailored SD folder (contract C4) and how to load it.

Layout::

    OUT/                       a StableDiffusionPipeline.save_pretrained folder (safetensors);
      unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json
                               its unet/ is the best-PSNR checkpoint once selection ran
      cyclex_tailored.json     generator spec, vocabulary, prompt template, uncertain_as_present, sample_size
      selection.json           {"best_psnr": "checkpoints/checkpoint-000400", "best_l1", "best_l2", "final", "metrics"}
      training_config.json     TailoredTrainingConfig
      split.json               train / validation ids
      checkpoints/checkpoint-NNNNNN/unet/   every kept checkpoint's UNet (plus accelerate's resume state);
                               a save in progress is checkpoint-NNNNNN.partial/, renamed when complete
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cyclex.findings import ABNORMALITIES
from cyclex.tailored_training.config import TailoredTrainingConfig, write_json_atomic

logger = logging.getLogger(__name__)

METADATA_NAME = "cyclex_tailored.json"
SELECTION_NAME = "selection.json"
SELECTORS = ("best_psnr", "best_l1", "best_l2", "final")
FORMAT_VERSION = 1


def write_tailored_metadata(output_dir: str | Path, *, manifest: str | Path, base: str,
                            config: TailoredTrainingConfig, generator_spec: str | None, global_step: int,
                            num_processes: int = 1) -> Path:
    """Write `cyclex_tailored.json`; template and uncertain_as_present come from the data set's `dataset.json`."""
    from cyclex.tailored_training.webdataset_shards import is_webdataset_source, shards_folder

    if is_webdataset_source(manifest):  # shards: their folder's dataset.json (write_webdataset_shards copies it)
        described = shards_folder(manifest) / "dataset.json"
    else:
        manifest = Path(manifest)
        described = manifest.parent / "dataset.json" if manifest.is_file() else manifest / "dataset.json"
    manifest = Path(str(manifest))
    dataset = json.loads(described.read_text()) if described.is_file() else {}
    metadata = {
        "format_version": FORMAT_VERSION,
        "generator": generator_spec or dataset.get("generator"),
        "vocabulary": list(ABNORMALITIES),
        "prompt_template": dataset.get("template", "cvlm"),
        "uncertain_as_present": dataset.get("uncertain_as_present", True),
        "prompt_source": dataset.get("prompt_source", "generated"),
        "sample_size": config.resolution,
        "base_model": base,
        "manifest": str(manifest.resolve()),
        "global_step": global_step,
        "p_uncond": config.p_uncond,
        "num_processes": num_processes,
    }
    return write_json_atomic(Path(output_dir) / METADATA_NAME, metadata)


def read_tailored_metadata(path: str | Path) -> dict:
    """The folder's `cyclex_tailored.json`, with `selection` (selection.json, or None) added."""
    folder = Path(path)
    meta_path = folder / METADATA_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a tailored SD folder: {METADATA_NAME} is missing")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}") from err
    for key in ("vocabulary", "prompt_template", "sample_size"):
        if key not in metadata:
            raise ValueError(f"{meta_path} lacks the field {key!r}")
    selection_path = folder / SELECTION_NAME
    metadata["selection"] = json.loads(selection_path.read_text()) if selection_path.is_file() else None
    return metadata


def resolve_checkpoint(path: str | Path, checkpoint: str = "best_psnr") -> Path | None:
    """Folder holding the UNet for `checkpoint`; None means the pipeline folder's own `unet/`.

    checkpoint: best_psnr | best_l1 | best_l2 | final | a subfolder such as "checkpoints/checkpoint-000400".
    """
    folder = Path(path)
    selection_path = folder / SELECTION_NAME
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else None
    if checkpoint in SELECTORS:
        if selection is None:
            if checkpoint in ("best_l1", "best_l2"):
                raise FileNotFoundError(f"{folder} has no {SELECTION_NAME}: run checkpoint selection to use {checkpoint!r}")
            logger.warning("%s has no %s; using the final UNet of the pipeline folder", folder, SELECTION_NAME)
            return None
        if checkpoint == "best_psnr":
            return None  # the root unet/ is the best-PSNR checkpoint (contract C4)
        relative = selection.get(checkpoint)
        if not relative:
            raise ValueError(f"{selection_path} has no entry {checkpoint!r}")
        target = folder / relative
    else:
        target = Path(checkpoint) if Path(checkpoint).is_absolute() else folder / checkpoint
    if not (target / "unet").is_dir():
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} of {folder}: {target / 'unet'} does not exist; valid names: {', '.join(SELECTORS)} "
            "or a checkpoints/checkpoint-NNNNNN subfolder"
        )
    return target


def clean_scheduler_config(scheduler_cls, config) -> dict:
    """The entries of a scheduler `config` that `scheduler_cls` takes (plus diffusers' `_` keys).

    A base SD's PNDM config carries `skip_prk_steps` through DDPM (training) into the saved DDIM
    config, and from there into every DDIMInverseScheduler, which warns each time a maker is built.
    """
    import inspect

    accepted = set(inspect.signature(scheduler_cls.__init__).parameters) - {"self", "kwargs"}
    return {k: v for k, v in dict(config).items() if k in accepted or k.startswith("_")}


def load_tailored_pipeline(path: str | Path, checkpoint: str = "best_psnr", device=None, dtype=None):
    """A `StableDiffusionPipeline` from a tailored folder, its UNet taken from `checkpoint` (offline)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved pipeline folder: model_index.json is missing")
    kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    source = resolve_checkpoint(folder, checkpoint)
    if source is not None:
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **kwargs)
    # folders saved before the scheduler config was cleaned still carry another class's keys
    pipe.scheduler = type(pipe.scheduler).from_config(clean_scheduler_config(type(pipe.scheduler),
                                                                            pipe.scheduler.config))
    if dtype is not None:
        pipe.to(dtype=dtype)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
