"""What a tailored training run is, so that a second run into the same folder resumes it or is refused.

`train-tailored` (and `train_tailored`) resume from the latest checkpoint of `--out`. That is only
right when the folder holds the *same* run: the same generator (its reports are the prompts), the
same base SD and the same training settings (the step count shapes the lr schedule). The identity
is written as `OUT/training_run.json` when a run starts; a later run with another identity is
refused with the fields that differ, unless `overwrite` (the CLI's `--overwrite`) deletes the
earlier run's files first, as `cyclex explain` does for its run folders. Folders of a cyclex before
this file are read from their `training_config.json` and `cyclex_tailored.json`.

Only the files a tailored run writes are ever deleted (`TAILORED_RUN_ENTRIES`); symlinks are
unlinked, never followed, and anything else in the folder is kept and named in a warning.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cyclex.run_lock import is_lock_file
from cyclex.tailored_training.config import TailoredTrainingConfig, write_json_atomic

logger = logging.getLogger(__name__)

RUN_NAME = "training_run.json"
FORMAT_VERSION = 1
# Settings that do not change what is trained (logging, bookkeeping, which checkpoint to resume from,
# checkpoint selection after training): a resume with other values of these is fine.
NOT_IDENTITY = ("report_to", "resume_from_checkpoint", "dataloader_num_workers", "checkpoints_total_limit",
                "checkpointing_steps", "validation_steps", "num_inversion_steps", "selection_batch_size",
                "latent_cache_dir", "latent_cache_shard_size")  # where latents are kept changes no number
# What a tailored run writes into its folder (train_tailored, the CLI's data set, selection, trackers).
TAILORED_RUN_ENTRIES = ("dataset", "checkpoints", "logs", "unet", "vae", "text_encoder", "tokenizer", "scheduler",
                        "model_index.json", "cyclex_tailored.json", "selection.json", "training_config.json",
                        "split.json", RUN_NAME)


class TrainingRunMismatch(ValueError):
    """The output folder holds a tailored run made with another generator, base or settings."""

    def __init__(self, message: str, changed: list[str]) -> None:
        super().__init__(message)
        self.changed = changed


def _base_id(base: str | Path) -> str:
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else str(base)


def training_identity(generator_spec: str | None, base: str | Path, config: TailoredTrainingConfig) -> dict[str, Any]:
    """{"generator", "base", "config": the settings that shape training (warm-up resolved)}."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_IDENTITY}
    settings["lr_warmup_steps"] = config.resolved_warmup_steps()
    return {"format_version": FORMAT_VERSION, "generator": generator_spec, "base": _base_id(base), "config": settings}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingRunMismatch(f"{path} is not readable JSON ({err}); pass --overwrite to start over", []) from None
    return data if isinstance(data, dict) else None


def previous_identity(output_dir: str | Path) -> dict[str, Any] | None:
    """The identity of the run already in `output_dir` (None: no run there), as far as it is known."""
    out = Path(output_dir)
    recorded = _read_json(out / RUN_NAME)
    if recorded is not None:
        return recorded
    config = _read_json(out / "training_config.json")
    metadata = _read_json(out / "cyclex_tailored.json")
    if config is None and metadata is None:
        return None
    identity: dict[str, Any] = {}  # a folder of an earlier cyclex: compare what it recorded
    if config is not None:
        try:
            identity["config"] = training_identity(None, "", TailoredTrainingConfig.from_dict(config))["config"]
        except (TypeError, ValueError):
            identity["config"] = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    if metadata is not None:
        identity["generator"] = metadata.get("generator")
        identity["base"] = _base_id(metadata["base_model"]) if metadata.get("base_model") else None
    return identity


def identity_differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Names of what differs ("generator", "base", "config.max_train_steps", ...), among what both record."""
    # a key this call does not know (a library call without generator_spec) is not compared
    changed = [key for key in ("generator", "base")
               if key in previous and current.get(key) is not None and previous[key] != current[key]]
    old, new = previous.get("config") or {}, current["config"]
    changed += [f"config.{k}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    return changed


def remove_tailored_run(output_dir: str | Path, keep: Sequence[str | Path] = ()) -> list[Path]:
    """Delete what a tailored run wrote in `output_dir` (symlinks unlinked, not followed); returns what was kept.

    keep: paths that must survive (the manifest the new run trains on may lie in OUT/dataset).
    """
    out = Path(output_dir)
    kept_paths = [Path(p).resolve() for p in keep]
    for name in TAILORED_RUN_ENTRIES:
        path = out / name
        if any(k == path.resolve() or path.resolve() in k.parents for k in kept_paths):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    kept = sorted(p for p in out.iterdir() if not is_lock_file(p.name)) if out.is_dir() else []  # the lock is ours
    if kept:
        logger.warning("%s: --overwrite kept %d entries a tailored run does not write: %s", out, len(kept),
                       ", ".join(p.name for p in kept[:5]))
    return kept


def check_training_run(output_dir: str | Path, identity: Mapping[str, Any], *, overwrite: bool = False,
                       record: bool = True, keep: Sequence[str | Path] = ()) -> None:
    """Make `output_dir` this run's folder: resume the same run, start over with `overwrite`, or refuse.

    Refuses (TrainingRunMismatch naming the differing fields and --overwrite) when the folder holds
    a run with another generator, base or training settings. record: write the identity as
    RUN/training_run.json (the run owns the folder from now on). keep: paths `overwrite` leaves alone.
    """
    out = Path(output_dir)
    previous = previous_identity(out)
    if previous is not None and overwrite:
        logger.info("%s: --overwrite: removing the earlier tailored run", out)
        remove_tailored_run(out, keep=keep)
    elif previous is not None:
        changed = identity_differences(previous, identity)
        if changed:
            shown = ", ".join(f"{key} ({_value(previous, key)!r} -> {_value(identity, key)!r})" for key in changed[:6])
            raise TrainingRunMismatch(
                f"{out} holds a tailored run made with other settings ({shown}); resuming it would mix two runs. "
                "Use another --out, or pass --overwrite to delete that run and start over", changed)
    if record:
        write_json_atomic(out / RUN_NAME, dict(identity))


def _value(identity: Mapping[str, Any], key: str) -> Any:
    if key.startswith("config."):
        return (identity.get("config") or {}).get(key[len("config."):])
    return identity.get(key)


__all__ = ["RUN_NAME", "TAILORED_RUN_ENTRIES", "TrainingRunMismatch", "check_training_run", "previous_identity",
           "remove_tailored_run", "training_identity"]
