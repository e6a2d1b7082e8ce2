"""The demo's instruction editor: a tiny InstructPix2Pix-style pipeline shipped in the package.

Trained from the clean demo generator's tailored SD on exact phantom pairs by
`scripts/build_demo_instruct.py` (float16 on disk, read as float32). `--instruct-model demo` names it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_INSTRUCT_DIR = Path(__file__).parent / "weights" / "instruct"
DEMO_INSTRUCT_SPEC = "demo"


def resolve_instruct_model(spec: str) -> str:
    """`demo` -> the shipped demo editor's folder; anything else (a folder or hub id) unchanged."""
    if spec.strip().lower() in (DEMO_INSTRUCT_SPEC, "demo:clean"):
        if not (DEMO_INSTRUCT_DIR / "model_index.json").is_file():
            raise FileNotFoundError(f"the demo instruction editor is not in {DEMO_INSTRUCT_DIR}; build it with "
                                    "scripts/build_demo_instruct.py")
        return str(DEMO_INSTRUCT_DIR)
    return spec
