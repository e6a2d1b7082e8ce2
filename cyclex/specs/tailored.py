"""Name a tailored Stable Diffusion in one string: a folder, or `demo:clean` / `demo:shortcut`.

`resolve_tailored("demo:clean")` is the demo's tailored SD of the `clean` generator, installed into
`$CYCLEX_HOME/demo/tailored/clean` from the weights the package ships (built only when the package
ships none); any other text is a folder written by `cyclex train-tailored --out`.

`generator_mismatch(tailored_dir, generator_spec)` says whether the tailored SD was trained on
another generator's reports than the one being explained (its `cyclex_tailored.json` records it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"


def resolve_tailored(spec: str | Path) -> Path:
    """The tailored SD folder `spec` names ('demo:NAME' or a path); a missing folder is an error naming it."""
    text = str(spec)
    if text.startswith(DEMO_PREFIX):
        from cyclex.demo.base_sd import DEMO_BUILD_FILE, build_demo_tailored, demo_tailored_dir
        from cyclex.demo.generators import DEMO_GENERATOR_NAMES
        from cyclex.demo.packaged import install_packaged_assets

        name = text[len(DEMO_PREFIX):]
        if name not in DEMO_GENERATOR_NAMES:
            raise ValueError(f"--tailored {text!r}: unknown demo tailored SD {name!r}; known: "
                             f"{', '.join(DEMO_PREFIX + n for n in DEMO_GENERATOR_NAMES)}")
        folder = demo_tailored_dir(name)
        if not (folder / "selection.json").is_file():
            install_packaged_assets()
        if not ((folder / "selection.json").is_file() or (folder / DEMO_BUILD_FILE).is_file()):
            logger.warning("the package ships no tailored SD for demo:%s; building it (minutes)", name)
            folder = build_demo_tailored(name)
        return folder
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--tailored {text}: no such folder; pass a folder written by `cyclex train-tailored "
                                "--out`, or demo:clean / demo:shortcut")
    return folder


def _spec_identity(spec: str) -> str:
    """The part of a generator spec that names the model (options after '::' dropped, local paths resolved)."""
    kind, _, rest = str(spec).partition(":")
    parts = rest.split("::")
    named = parts[:3] if kind.lower() in ("r2gen", "r2gencmn") else parts[:1]
    resolved = [str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().exists() else p for p in named]
    return f"{kind.lower()}:{'::'.join(resolved)}"


def trained_generator(tailored_dir: str | Path) -> str | None:
    """The generator spec the tailored SD was trained on (its cyclex_tailored.json), None when unrecorded."""
    path = Path(tailored_dir) / "cyclex_tailored.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("generator")
    except (OSError, json.JSONDecodeError):
        return None


def generator_mismatch(tailored_dir: str | Path, generator_spec: str) -> str | None:
    """A warning when `tailored_dir` was trained on another generator's reports than `generator_spec`."""
    trained = trained_generator(tailored_dir)
    if not trained or _spec_identity(trained) == _spec_identity(generator_spec):
        return None
    return (f"the tailored SD {tailored_dir} was trained on the reports of {trained}, not of {generator_spec}: "
            f"its prompts follow that generator's wording and findings, so removals may not match what "
            f"{generator_spec} reports; train one for it with `cyclex train-tailored --generator {generator_spec}`")


__all__ = ["generator_mismatch", "resolve_tailored", "trained_generator"]
